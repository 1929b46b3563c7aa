//! Compiled programs kept by source text, shared by every caller that clones the cache.

use std::fmt::{self};
use std::sync::Arc;

use super::*;

/// The most programs a [`ProgramCache`] keeps before it starts over: definitions are few, so this
/// only bounds the growth that many one-off inline definitions would cause.
pub const PROGRAM_CACHE_LIMIT: usize = 10_000;

/// Compiled programs keyed by source text, shared by every caller that clones the cache.
#[derive(Clone, Default)]
pub struct ProgramCache {
    programs: Arc<std::sync::Mutex<std::collections::HashMap<String, Program>>>,
}

impl fmt::Debug for ProgramCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProgramCache")
            .field("programs", &self.lock().len())
            .finish()
    }
}

impl ProgramCache {
    /// Whether `source` is compiled already.
    pub fn contains(&self, source: &str) -> bool {
        self.lock().contains_key(source)
    }

    /// Whether `source` is compiled already and quick ([`Program::is_quick`]).
    pub fn is_quick(&self, source: &str) -> bool {
        self.lock().get(source).is_some_and(Program::is_quick)
    }

    /// Returns the compiled program for `source`, compiling it on first use.
    pub fn get(&self, source: &str) -> Result<Program, CompileError> {
        let mut programs = self.lock();
        if let Some(program) = programs.get(source) {
            return Ok(program.clone());
        }
        let program = Program::compile(source)?;
        if programs.len() >= PROGRAM_CACHE_LIMIT {
            programs.clear();
        }
        programs.insert(source.to_owned(), program.clone());
        Ok(program)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Program>> {
        crate::sync::lock(&self.programs)
    }
}
