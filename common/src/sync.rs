//! Locks that outlive a panic.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, taking the value as it is when a thread panicked while holding it: every
/// value this project keeps behind a mutex stays consistent between statements, so a panic
/// elsewhere is no reason to stop the process.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
