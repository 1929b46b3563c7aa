//! The benchmark drives the worker's executors in process, so it links libpython like the worker:
//! with a run path, so no `LD_LIBRARY_PATH` is needed at run time.
fn main() {
    pyo3_build_config::add_libpython_rpath_link_args();
}
