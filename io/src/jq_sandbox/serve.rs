//! The sandbox process itself: runs jq programs it reads from standard input, one at a time,
//! under a limit on its address space, and writes each outcome to standard output.
//!
//! Two threads: the main thread reads requests and hands them over; the `jq` thread (with a
//! large stack, since jaq recurses on it) runs them and writes the replies. The main thread
//! therefore sees the end of its input while a program still runs, and the process leaves at
//! once: a sandbox whose caller died or gave up never outlives it. A program that allocates
//! past the limit ends the process (Rust aborts when an allocation fails), and so does one that
//! overflows its stack; the caller tells which from the last words on standard error.

use std::io::{self, BufReader, Write};
use std::sync::mpsc;

use taskfleet_common::jq::ProgramCache;

use super::frame::{self, Reply, Request};

/// Stack of the thread programs run on; jaq's recursion takes one frame per level of a
/// program's nesting, and deep recursion in a program ends in an overflow of this stack.
const JQ_STACK_BYTES: usize = 64 * 1024 * 1024;

/// The largest request read, in bytes; a request is at most an input the API accepted and a
/// program of at most `taskfleet_common::jq::MAX_PROGRAM_LEN` bytes, far below this.
const MAX_REQUEST_BYTES: usize = 1 << 30;

/// Serves as a sandbox, and never returns, when this process was started as one (its first
/// argument is [`super::SANDBOX_FLAG`], its second the memory limit in bytes); returns
/// otherwise. Called first thing in `main`, before settings are read: a sandbox reads none, so
/// no setting of its parent's environment can keep it from starting.
pub fn serve_if_started_as_one() {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() != Some(std::ffi::OsStr::new(super::SANDBOX_FLAG)) {
        return;
    }
    match args.next().and_then(|bytes| bytes.to_str()?.parse().ok()) {
        Some(memory_bytes) => serve(memory_bytes),
        None => {
            let _ = writeln!(
                io::stderr(),
                "jq sandbox: {} takes the memory limit in bytes",
                super::SANDBOX_FLAG
            );
            std::process::exit(2)
        }
    }
}

/// Serves as a sandbox until standard input ends; `memory_bytes` is how much more address space
/// the process may take once it has started. Never returns.
pub fn serve(memory_bytes: u64) -> ! {
    // A panic inside a program's run is answered as a failure; its message is not wanted on
    // standard error, which the caller reads only for the last words of a process that died.
    std::panic::set_hook(Box::new(|_| {}));
    let code = match serve_requests(memory_bytes) {
        Ok(()) => 0,
        Err(error) => {
            let _ = writeln!(io::stderr(), "jq sandbox: {error}");
            2
        }
    };
    std::process::exit(code)
}

fn serve_requests(memory_bytes: u64) -> io::Result<()> {
    let (requests, received) = mpsc::sync_channel::<Vec<u8>>(1);
    let (ready, started) = mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("jq".to_owned())
        .stack_size(JQ_STACK_BYTES)
        .spawn(move || run_requests(&received, &ready))?;
    // The jq thread has its stack and its allocator's arena now: the limit counts from here.
    started
        .recv()
        .map_err(|_| io::Error::other("the jq thread did not start"))?;
    limit_address_space(memory_bytes)?;
    let mut stdout = io::stdout().lock();
    frame::write_frame(&mut stdout, &encode(&Reply::Ready))?;
    drop(stdout);
    let mut stdin = BufReader::new(io::stdin().lock());
    while let Some(body) = frame::read_frame(&mut stdin, MAX_REQUEST_BYTES)? {
        if requests.send(body).is_err() {
            break;
        }
    }
    Ok(())
}

/// Sets the process's address-space limit to what it uses now plus `memory_bytes`.
fn limit_address_space(memory_bytes: u64) -> io::Result<()> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let used_kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmSize:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| io::Error::other("/proc/self/status has no VmSize"))?;
    let limit = used_kib.saturating_mul(1024).saturating_add(memory_bytes);
    rlimit::setrlimit(rlimit::Resource::AS, limit, limit)
}

/// The jq thread: runs each request and writes its reply. Ends the process when its output
/// closes.
fn run_requests(received: &mpsc::Receiver<Vec<u8>>, ready: &mpsc::Sender<()>) {
    let programs = ProgramCache::default();
    // One allocation on this thread before the limit is set, so that its arena is counted
    // among what the process holds at rest.
    let warm: Vec<u8> = Vec::with_capacity(4096);
    drop(warm);
    let _ = ready.send(());
    for body in received {
        let reply = match serde_json::from_slice::<Request>(&body) {
            Ok(request) => run(&programs, request),
            Err(error) => Reply::Failed(format!("the jq sandbox cannot read a request: {error}")),
        };
        let mut stdout = io::stdout().lock();
        if frame::write_frame(&mut stdout, &encode(&reply)).is_err() {
            std::process::exit(0);
        }
    }
}

/// Runs one request.
fn run(programs: &ProgramCache, request: Request) -> Reply {
    let program = match programs.get(&request.program) {
        Ok(program) => program,
        Err(error) => return Reply::Failed(error.to_string()),
    };
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        program.run_all(request.input, request.output_limit)
    }));
    match ran {
        Ok(Ok(outputs)) => Reply::Outputs(outputs),
        Ok(Err(error)) => Reply::Failed(error.to_string()),
        Err(_) => Reply::Failed("jq program panicked".to_owned()),
    }
}

/// Encodes a reply; the values in it came from JSON or were checked by the jq module, so this
/// cannot fail short of running out of memory.
fn encode(reply: &Reply) -> Vec<u8> {
    serde_json::to_vec(reply).unwrap_or_else(|error| {
        serde_json::to_vec(&Reply::Failed(format!(
            "jq output cannot be encoded: {error}"
        )))
        .unwrap_or_default()
    })
}
