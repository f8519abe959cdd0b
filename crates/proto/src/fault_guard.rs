//! Surviving a shared-memory object that another process shrinks under us.
//!
//! Touching a page of a `MAP_SHARED` mapping that lies past the end of its (truncated) file
//! raises SIGBUS, whose default action kills the process: any local client could take a server
//! down by registering an object and then truncating it. Display servers, which share pools
//! with clients they cannot trust, solve this the way done here: a SIGBUS handler recognises a
//! fault inside a guarded mapping, maps anonymous zero pages over the whole mapping so the
//! faulting copy completes, and marks the mapping broken. Whoever used the mapping checks
//! [`Guard::is_broken`] after the copy and fails its request; the data it copied is zeros, never
//! another process's memory. Faults anywhere else go to the handler that was there before
//! (Rust's stack-overflow handler, or the default action), so real bugs still crash.
//!
//! The table is a fixed array of atomics: the handler may run at any instant on any thread,
//! so it must neither lock nor allocate.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Mappings guarded at once; a mapping that finds no free entry is refused (see
/// [`Guard::new`]), never left unguarded.
pub const CAPACITY: usize = 8192;

struct Entry {
    start: AtomicUsize,
    len: AtomicUsize,
    broken: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Entry = Entry {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    broken: AtomicBool::new(false),
};

static ENTRIES: [Entry; CAPACITY] = [FREE; CAPACITY];

/// Where the next search for a free entry starts, so taking one is O(1) while the table has
/// room (entries are freed in roughly the order they were taken).
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// The SIGBUS disposition found when the handler was installed; faults outside guarded
/// mappings go there.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// One guarded mapping's entry; dropping it stops guarding (do that before unmapping).
#[derive(Debug)]
pub struct Guard {
    index: usize,
}

impl Guard {
    /// Guards `[start, start + len)`. `None` when every entry is taken or the handler could
    /// not be installed.
    pub fn new(start: *const u8, len: usize) -> Option<Guard> {
        install()?;
        let start = start as usize;
        if start == 0 || len == 0 {
            return None;
        }
        let first = NEXT.load(Ordering::Relaxed);
        for index in (first..CAPACITY).chain(0..first) {
            let e = &ENTRIES[index];
            if e.start
                .compare_exchange(0, start, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                e.broken.store(false, Ordering::Release);
                e.len.store(len, Ordering::Release);
                NEXT.store((index + 1) % CAPACITY, Ordering::Relaxed);
                return Some(Guard { index });
            }
        }
        None
    }

    /// Whether a fault replaced the mapping with zero pages: what was read from it since may
    /// be zeros, and what was written to it went nowhere.
    pub fn is_broken(&self) -> bool {
        ENTRIES[self.index].broken.load(Ordering::Acquire)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let e = &ENTRIES[self.index];
        e.len.store(0, Ordering::Release);
        e.start.store(0, Ordering::Release);
    }
}

/// Installs the handler once per process; `None` if `sigaction` failed.
fn install() -> Option<()> {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    let ok = *INSTALLED.get_or_init(|| {
        // SAFETY: plain sigaction calls with zero-initialised, then filled, structures.
        unsafe {
            let mut previous: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut previous) != 0 {
                return false;
            }
            let _ = PREVIOUS.set(previous);
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) == 0
        }
    });
    ok.then_some(())
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel hands a valid siginfo to an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    for e in &ENTRIES {
        let start = e.start.load(Ordering::Acquire);
        let len = e.len.load(Ordering::Acquire);
        if start == 0 || addr < start || addr - start >= len {
            continue;
        }
        // SAFETY: replaces exactly the guarded range, which its owner keeps mapped while it
        // uses it (the fault came from such a use), with private zero pages.
        let mapped = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if mapped != libc::MAP_FAILED {
            e.broken.store(true, Ordering::Release);
            return;
        }
        break;
    }
    forward(sig, info, ctx);
}

/// Hands a fault we do not own to the previous disposition.
fn forward(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let previous = PREVIOUS.get();
    let handler = previous.map_or(libc::SIG_DFL, |p| p.sa_sigaction);
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        // Back to the default action and return: the faulting instruction runs again and the
        // process ends with SIGBUS, as it would have without us.
        // SAFETY: async-signal-safe call with a zeroed (SIG_DFL) action.
        unsafe {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
        }
        return;
    }
    let siginfo = previous.is_some_and(|p| p.sa_flags & libc::SA_SIGINFO != 0);
    // SAFETY: calls the handler that was installed for this signal, with the signature its
    // flags declare.
    unsafe {
        if siginfo {
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                std::mem::transmute(handler);
            f(sig, info, ctx);
        } else {
            let f: extern "C" fn(libc::c_int) = std::mem::transmute(handler);
            f(sig);
        }
    }
}
