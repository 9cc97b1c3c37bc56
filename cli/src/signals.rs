//! SIGTERM, SIGINT and SIGHUP as a future, for graceful shutdown and worker drains.

/// Resolves at SIGTERM, SIGINT or SIGHUP (a closed terminal: `smelt up` stops its cluster, and
/// its workers, which got it too, drain, rather than die and leave the rest running).
pub async fn terminated() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install a SIGINT handler");
    let mut hup = signal(SignalKind::hangup()).expect("install a SIGHUP handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = hup.recv() => {}
    }
}

/// For a child of `smelt up` (`pre_exec`): SIGTERM when `up` dies, however it dies (SIGKILL, the
/// OOM killer), so the coordinator stops and the workers drain rather than run on orphaned. The
/// parent may have died before the child got here: then at once.
#[cfg(target_os = "linux")]
pub fn exit_with_parent() -> impl FnMut() -> std::io::Result<()> + Send + Sync + 'static {
    let parent = std::process::id() as libc::pid_t;
    move || {
        // prctl, getppid and raise are async-signal-safe
        unsafe {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                libc::raise(libc::SIGTERM);
            }
        }
        Ok(())
    }
}

/// A client command piped into a reader that goes away (`smelt jobs list | head -1`) ends by
/// SIGPIPE, as Unix tools do, rather than panicking in `println!` (Rust ignores SIGPIPE). Only
/// then: the handler ends the process when stdout is a pipe or socket whose reader has gone, and
/// otherwise returns, so a write to a coordinator connection that broke fails with EPIPE and is
/// handled as the error it is (tokio writes sockets with `writev`, which raises SIGPIPE too: with
/// the default action a restarting coordinator would kill `smelt jobs follow` without a word).
pub fn end_quietly_when_stdout_closes() {
    extern "C" fn on_sigpipe(_: libc::c_int) {
        // poll and sigaction and raise are async-signal-safe
        let mut fd = libc::pollfd { fd: libc::STDOUT_FILENO, events: 0, revents: 0 };
        let gone = unsafe { libc::poll(&mut fd, 1, 0) } == 1 && fd.revents & (libc::POLLERR | libc::POLLHUP) != 0;
        if gone {
            unsafe {
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                libc::raise(libc::SIGPIPE);
            }
        }
    }
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigpipe as extern "C" fn(libc::c_int) as *const () as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGPIPE, &action, std::ptr::null_mut());
    }
}
