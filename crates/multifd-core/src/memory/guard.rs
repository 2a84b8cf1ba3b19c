//! The SIGBUS guard for file mappings.
//!
//! Touching a page of a MAP_SHARED file mapping that lies past the file's end (the file was
//! truncated while we read it), or that the filesystem cannot back (a full disk, on a write),
//! raises SIGBUS, which kills the process by default. Every file mapping registers its address
//! range here; the handler, on a SIGBUS inside a registered range, maps an anonymous zero page
//! over the faulting page (so the faulting instruction, when it runs again, reads or writes
//! that page instead), sets the range's `faulted` flag and returns. The thread then finishes
//! its packet with zeros and fails with a clear code when it checks the flag (once per
//! packet). A SIGBUS anywhere else goes to the handler that was installed before ours (or the
//! default action, which ends the process as it would have without us).
//!
//! The handler only does async-signal-safe things: atomic loads and stores on a static table,
//! and one `mmap` system call. The table is a chain of fixed-size slabs that are never freed,
//! so the handler can walk it without locks while other threads register and unregister.

use std::sync::{Once, OnceLock};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};

use crate::error::{Error, ErrorCode, Result};

const SLAB: usize = 64;

struct Slot {
    used: AtomicBool,
    start: AtomicUsize,
    /// Zero while the slot is being filled or emptied, so the handler never matches it then.
    end: AtomicUsize,
    faulted: AtomicBool,
}

impl Slot {
    const fn new() -> Slot {
        Slot { used: AtomicBool::new(false), start: AtomicUsize::new(0), end: AtomicUsize::new(0), faulted: AtomicBool::new(false) }
    }
}

struct Slab {
    slots: [Slot; SLAB],
    next: AtomicPtr<Slab>,
}

static FIRST: Slab = Slab { slots: [const { Slot::new() }; SLAB], next: AtomicPtr::new(std::ptr::null_mut()) };
static INSTALL: Once = Once::new();
static INSTALLED: AtomicBool = AtomicBool::new(false);
static PAGE: AtomicUsize = AtomicUsize::new(4096);
/// The SIGBUS action that was in place before ours, for addresses that are not ours. Set
/// before our handler is installed; the handler only reads it (an atomic load).
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

fn slabs() -> impl Iterator<Item = &'static Slab> {
    let mut next: Option<&'static Slab> = Some(&FIRST);
    std::iter::from_fn(move || {
        let s = next?;
        // SAFETY: slabs are leaked boxes, never freed, so every non-null link stays valid.
        next = unsafe { s.next.load(Ordering::Acquire).as_ref() };
        Some(s)
    })
}

/// A registered range; unregisters on drop.
#[derive(Debug)]
pub struct Registration {
    slot: &'static Slot,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot").field("start", &self.start).field("end", &self.end).finish()
    }
}

impl Registration {
    pub fn faulted(&self) -> bool {
        self.slot.faulted.load(Ordering::Acquire)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.slot.end.store(0, Ordering::Release);
        self.slot.start.store(0, Ordering::Release);
        self.slot.used.store(false, Ordering::Release);
    }
}

/// Guards `start..start + len` (installing the handler on first use).
pub fn register(start: usize, len: usize) -> Result<Registration> {
    install()?;
    let slot = loop {
        if let Some(s) = slabs().flat_map(|s| s.slots.iter()).find(|s| s.used.compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed).is_ok()) {
            break s;
        }
        // Every slot is taken: chain a new slab at the end (another thread may win; retry).
        let last = slabs().last().expect("FIRST is always there");
        let fresh = Box::into_raw(Box::new(Slab { slots: [const { Slot::new() }; SLAB], next: AtomicPtr::new(std::ptr::null_mut()) }));
        if last.next.compare_exchange(std::ptr::null_mut(), fresh, Ordering::AcqRel, Ordering::Acquire).is_err() {
            // SAFETY: `fresh` was never published; we still own it.
            drop(unsafe { Box::from_raw(fresh) });
        }
    };
    slot.faulted.store(false, Ordering::Release);
    slot.start.store(start, Ordering::Release);
    slot.end.store(start + len, Ordering::Release);
    Ok(Registration { slot })
}

fn install() -> Result<()> {
    INSTALL.call_once(|| {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if page > 0 {
            PAGE.store(page as usize, Ordering::Relaxed);
        }
        // SAFETY: zeroed sigactions are valid starting points; the first call only reads the
        // current action, the second installs ours (handler, flags, an empty mask) once the
        // previous one is kept where the handler finds it.
        unsafe {
            let mut previous: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut previous) != 0 {
                return;
            }
            let _ = PREVIOUS.set(previous);
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) == 0 {
                INSTALLED.store(true, Ordering::Release);
            }
        }
    });
    if !INSTALLED.load(Ordering::Acquire) {
        return Err(Error::new(ErrorCode::Io, format!("install the SIGBUS guard for file mappings: {}", std::io::Error::last_os_error())));
    }
    Ok(())
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    for slot in slabs().flat_map(|s| s.slots.iter()) {
        let end = slot.end.load(Ordering::Acquire);
        let start = slot.start.load(Ordering::Acquire);
        if start <= addr && addr < end {
            let page = PAGE.load(Ordering::Relaxed);
            let at = addr & !(page - 1);
            // SAFETY: replaces one page inside a live registered mapping (it is unregistered
            // before it is unmapped) with private zero memory; mmap is a plain system call.
            let r = unsafe { libc::mmap(at as *mut libc::c_void, page, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED, -1, 0) };
            if r != libc::MAP_FAILED {
                slot.faulted.store(true, Ordering::Release);
                return;
            }
            break;
        }
    }
    // Not ours: what would have happened without us.
    let Some(previous) = PREVIOUS.get() else { return };
    let handler = previous.sa_sigaction;
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        // Restore the default and return: the faulting access runs again and ends the process
        // with SIGBUS, as it would have.
        // SAFETY: resetting a signal disposition is async-signal-safe.
        unsafe {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
        }
    } else if previous.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous handler was installed with SA_SIGINFO, so it has this signature.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = unsafe { std::mem::transmute(handler) };
        f(sig, info, ctx);
    } else {
        // SAFETY: a plain handler takes the signal number only.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
        f(sig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_reused_and_chained() {
        let many: Vec<_> = (0..SLAB * 2 + 3).map(|i| register(0x1000 + i * 0x1000, 0x1000).unwrap()).collect();
        assert!(slabs().count() >= 3);
        assert!(many.iter().all(|r| !r.faulted()));
        drop(many);
        let again = register(0x1000, 0x1000).unwrap();
        assert!(!again.faulted());
    }
}
