//! The few process-level OS calls of a key-holding process: no core dumps, memory locked where
//! permitted, enough file descriptors for many idle connections. All through nix's safe
//! wrappers, so the crate stays `forbid(unsafe_code)`. Runs once at start, before any key is
//! loaded; knows nothing about keys or HTTP.

use nix::sys::mman::{MlockAllFlags, mlockall};
use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit, setrlimit};

/// Whether to lock the process's memory (so cached keys are never swapped out).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemoryLock {
    /// Lock when the process may lock without limit (CAP_IPC_LOCK, or an unlimited
    /// RLIMIT_MEMLOCK); otherwise warn once and go on.
    Auto,
    /// Refuse to start unless memory can be locked.
    Required,
    Off,
}

/// What `harden` achieved, for the start-up log and for tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hardening {
    pub core_dumps_disabled: bool,
    pub memory_locked: bool,
    /// Why memory is not locked, when it is not.
    pub memory_note: Option<String>,
    pub open_files_limit: u64,
}

/// Disables core dumps (`PR_SET_DUMPABLE` 0, which also bars ptrace by other unprivileged
/// processes, and `RLIMIT_CORE` 0), locks memory per `lock`, and raises the open-files soft limit
/// to the hard one. Errors only when `lock` is `Required` and locking is impossible.
pub fn harden(lock: MemoryLock) -> Result<Hardening, String> {
    let core = setrlimit(Resource::RLIMIT_CORE, 0, 0).is_ok();
    let dumpable_off = nix::sys::prctl::set_dumpable(false).is_ok()
        && nix::sys::prctl::get_dumpable().is_ok_and(|d| !d);
    let open_files_limit = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Ok((soft, _)) => soft,
        Err(_) => 0,
    };
    let (memory_locked, memory_note) = match lock {
        MemoryLock::Off => (
            false,
            Some("memory locking is off (memory.lock = \"off\")".into()),
        ),
        MemoryLock::Auto | MemoryLock::Required => match lock_all() {
            Ok(()) => (true, None),
            Err(why) if lock == MemoryLock::Required => {
                return Err(format!("memory.lock = \"required\": {why}"));
            }
            Err(why) => (false, Some(why)),
        },
    };
    Ok(Hardening {
        core_dumps_disabled: core && dumpable_off,
        memory_locked,
        memory_note,
        open_files_limit,
    })
}

/// Locks current and future pages, but only when future allocations cannot then fail for lack
/// of lockable memory (which would abort the process later, far from here).
fn lock_all() -> Result<(), String> {
    let unlimited =
        matches!(getrlimit(Resource::RLIMIT_MEMLOCK), Ok((soft, _)) if soft == RLIM_INFINITY);
    if !unlimited && !has_cap_ipc_lock() {
        let kib = getrlimit(Resource::RLIMIT_MEMLOCK)
            .map(|(soft, _)| soft / 1024)
            .unwrap_or(0);
        return Err(format!(
            "cannot lock memory: RLIMIT_MEMLOCK is {kib} KiB and CAP_IPC_LOCK is not held \
             (systemd: LimitMEMLOCK=infinity, or AmbientCapabilities=CAP_IPC_LOCK); cached keys \
             may be swapped out"
        ));
    }
    // MCL_ONFAULT (Linux 4.4+): pages are locked as they are first touched, not all at once.
    // Without it every reserved-but-unused page (each thread's whole 2 MiB stack, allocator
    // arenas) becomes resident at once; with it, every page that ever holds data is still
    // locked before anything is written to it. nix has no name for the flag.
    // Its value is 4 on x86, x86-64, ARM and AArch64 (other architectures use other values).
    let flags = MlockAllFlags::MCL_CURRENT | MlockAllFlags::MCL_FUTURE;
    if cfg!(any(
        target_arch = "x86",
        target_arch = "x86_64",
        target_arch = "arm",
        target_arch = "aarch64"
    )) {
        const MCL_ONFAULT: i32 = 4;
        match mlockall(flags | MlockAllFlags::from_bits_retain(MCL_ONFAULT)) {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::info!(error = %e, "mlockall without MCL_ONFAULT: every mapped page is locked at once")
            }
        }
    }
    mlockall(flags).map_err(|e| format!("mlockall failed: {e}; cached keys may be swapped out"))
}

/// CAP_IPC_LOCK (bit 14) in the effective set, from /proc/self/status.
fn has_cap_ipc_lock() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}
