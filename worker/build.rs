//! Links the worker against the shared libpython that pyo3 found, with a run path so no
//! `LD_LIBRARY_PATH` is needed at run time.
fn main() {
    pyo3_build_config::add_libpython_rpath_link_args();
}
