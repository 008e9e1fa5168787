//! Everything that differs between operating systems, in one place.
//!
//! Linux is the first target; macOS builds through the same std/tokio/rustix calls, with
//! its own socket path limit.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Longest socket path the OS accepts, in bytes, without the terminating NUL
/// (`sizeof(sockaddr_un.sun_path) - 1`).
#[cfg(any(target_os = "macos", target_os = "ios", target_os = "freebsd"))]
pub const MAX_SOCKET_PATH: usize = 103;
#[cfg(not(any(target_os = "macos", target_os = "ios", target_os = "freebsd")))]
pub const MAX_SOCKET_PATH: usize = 107;

/// Milliseconds on a clock that never jumps and counts time asleep (`CLOCK_BOOTTIME` on
/// Linux), from an arbitrary start that holds until the machine restarts.
pub fn boot_clock_ms() -> i64 {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let id = rustix::time::ClockId::Boottime;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let id = rustix::time::ClockId::Monotonic;
    let t = rustix::time::clock_gettime(id);
    t.tv_sec as i64 * 1000 + t.tv_nsec as i64 / 1_000_000
}

/// What tells this boot of the machine from the others, where the OS says (Linux), so a
/// reading of [`boot_clock_ms`] can be compared with one taken before a restart.
pub fn boot_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id = id.trim();
    (!id.is_empty()).then(|| id.to_string())
}

/// Bytes an unprivileged process may still write on the file system holding `path`.
pub fn free_bytes(path: &std::path::Path) -> io::Result<u64> {
    let st = rustix::fs::statvfs(path)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Waits until `path` exists, asleep: on Linux an inotify watch on its directory wakes us
/// when a file is created or moved there; elsewhere we look once a second.
pub async fn wait_until_exists(path: &std::path::Path) -> io::Result<()> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use rustix::fs::inotify;
        use std::mem::MaybeUninit;
        let dir = path.parent().unwrap_or(std::path::Path::new("."));
        let fd = inotify::init(inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC)?;
        inotify::add_watch(
            &fd,
            dir,
            inotify::WatchFlags::CREATE | inotify::WatchFlags::MOVED_TO,
        )?;
        // SAFETY: `fd` is an OwnedFd moved into the AsyncFd, so it stays open and the same
        // descriptor until the AsyncFd is dropped.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .map_err(|e| e.into_parts().1)?;
        let mut buf = [MaybeUninit::<u8>::uninit(); 1024];
        loop {
            if path.exists() {
                return Ok(());
            }
            let mut ready = fd.readable().await?;
            let mut events = inotify::Reader::new(fd.get_ref(), &mut buf);
            loop {
                match events.next() {
                    Ok(_) => {}
                    Err(e) if e == rustix::io::Errno::AGAIN => break,
                    Err(e) => return Err(e.into()),
                }
            }
            ready.clear_ready();
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        while !path.exists() {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
        Ok(())
    }
}

/// Raises this process's soft limit on open files to its hard limit (a broker holds one
/// per connection), and returns the soft limit now in force.
pub fn raise_open_files_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        let _ = setrlimit(Resource::Nofile, limit);
    }
    getrlimit(Resource::Nofile).current
}

/// The real uid of this process.
pub fn current_uid() -> u32 {
    rustix::process::getuid().as_raw()
}

/// The uid of the process at the other end of a Unix socket (SO_PEERCRED on Linux,
/// getpeereid on macOS; tokio hides the difference).
pub fn peer_uid(stream: &tokio::net::UnixStream) -> io::Result<u32> {
    Ok(stream.peer_cred()?.uid())
}

/// Makes `cmd` start its child in a new session, detached from our terminal and process
/// group, so it outlives us and ignores the terminal's signals.
pub fn detach(cmd: &mut Command) {
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::setsid().map_err(io::Error::from)?;
            Ok(())
        });
    }
}

/// The pid of our parent process. When the parent dies we are re-parented, so a change
/// in this value means the parent is gone.
pub fn parent_pid() -> u32 {
    rustix::process::getppid().map_or(1, |p| p.as_raw_nonzero().get() as u32)
}

/// Returns once `parent` is no longer our parent process, that is, once it has exited.
/// On Linux a pidfd makes this one wait, with no wake-ups until then (hundreds of idle
/// sessions cost no CPU); elsewhere, or on kernels without pidfds (before 5.3), it looks
/// four times a second.
pub async fn parent_exited(parent: u32) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Some(pid) = rustix::process::Pid::from_raw(parent as i32)
        && let Ok(fd) = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
    {
        // The parent may have exited, and its pid been reused, before the pidfd was
        // opened: it refers to our parent only if that is still who our parent is.
        if parent_pid() != parent {
            return;
        }
        // SAFETY: `fd` is an OwnedFd moved into the AsyncFd, so it stays open and the same
        // descriptor until the AsyncFd is dropped.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        };
        // A pidfd becomes readable when its process exits.
        if let Ok(fd) = registered
            && fd.readable().await.is_ok()
        {
            return;
        }
    }
    while parent_pid() == parent {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// Whether a process with this pid exists (signal 0).
pub fn process_exists(pid: u32) -> bool {
    let Some(pid) = rustix::process::Pid::from_raw(pid as i32) else {
        return false;
    };
    match rustix::process::test_kill_process(pid) {
        Ok(()) => true,
        Err(e) => e == rustix::io::Errno::PERM,
    }
}

/// The terminal on our stdin, if any (e.g. `/dev/pts/3`).
pub fn tty_name() -> Option<String> {
    let stdin = std::io::stdin();
    if !rustix::termios::isatty(&stdin) {
        return None;
    }
    rustix::termios::ttyname(&stdin, Vec::new())
        .ok()
        .and_then(|s| s.into_string().ok())
}

/// This machine's host name.
pub fn host_name() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

/// A process's command line, where the OS shows it (`/proc` on Linux); `None` elsewhere or
/// when the process is gone.
pub fn command_line(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// The parent of process `pid`, where the OS shows it (`/proc/<pid>/stat` on Linux).
pub fn parent_of(pid: u32) -> Option<u32> {
    stat_field(pid, 4)?.parse().ok()
}

/// Field `n` (counted from 1, as in proc(5): 4 is the parent, 22 the start time) of
/// `/proc/<pid>/stat`.
pub fn stat_field(pid: u32, n: usize) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid …": comm may hold spaces and parentheses, so count from
    // the last ')', after which field 3 comes.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace()
        .nth(n.checked_sub(3)?)
        .map(str::to_string)
}

/// Our own ancestors, nearest first, at most `depth` of them, stopping before pid 1.
pub fn ancestors(depth: usize) -> Vec<u32> {
    let mut out = Vec::new();
    let mut pid = std::process::id();
    while out.len() < depth {
        match parent_of(pid) {
            Some(p) if p > 1 => {
                out.push(p);
                pid = p;
            }
            _ => break,
        }
    }
    out
}
