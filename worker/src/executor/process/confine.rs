//! What a Python executor may use (`docs/security.md`): resource limits on the process, set
//! before its interpreter starts, and, where the kernel has Landlock, a file system that is
//! read-only except for a scratch directory of its own, emptied after every step.

use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus,
};
use rlimit::Resource;
use serde::{Deserialize, Serialize};

/// The Landlock rights this build knows how to grant: those of ABI 3 (files and directories,
/// `refer`, `truncate`). A kernel with fewer is handled as far as it goes.
const LANDLOCK_ABI: ABI = ABI::V3;

/// The limits of an executor process; `None` leaves a limit as the process inherits it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confinement {
    /// Its address space, in bytes (`RLIMIT_AS`): past it, allocations fail (`MemoryError`).
    pub memory_bytes: Option<u64>,
    /// Its open files (`RLIMIT_NOFILE`).
    pub open_files: Option<u64>,
    /// The processes and threads its user may have (`RLIMIT_NPROC`; not applied to root).
    pub processes: Option<u64>,
    /// The CPU seconds it may use in its life (`RLIMIT_CPU`): past them it is killed, and
    /// replaced.
    pub cpu_seconds: Option<u64>,
    /// The directory it may write to (with Landlock), emptied after every step.
    pub scratch: Option<PathBuf>,
    /// Other directories it may write to (with Landlock), as the operator chose.
    pub writable: Vec<PathBuf>,
    /// Whether to confine its file system with Landlock, where the kernel has it.
    pub landlock: bool,
}

/// What [`Confinement::apply`] could enforce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileSystem {
    /// Landlock was not asked for.
    Open,
    /// Landlock confines the process as asked.
    Confined,
    /// The kernel has Landlock, but only part of what was asked.
    PartlyConfined,
    /// The kernel has no Landlock.
    Unconfined,
}

impl Confinement {
    /// Applies the limits to this process (and every thread and child it starts afterwards:
    /// call it before starting any). Limits already lower than asked are kept.
    pub fn apply(&self) -> Result<FileSystem, String> {
        for (resource, name, limit) in [
            (Resource::AS, "address space", self.memory_bytes),
            (Resource::NOFILE, "open files", self.open_files),
            (Resource::NPROC, "processes", self.processes),
            (Resource::CPU, "CPU time", self.cpu_seconds),
        ] {
            if let Some(limit) = limit {
                lower(resource, limit).map_err(|error| format!("limiting its {name}: {error}"))?;
            }
        }
        if !self.landlock {
            return Ok(FileSystem::Open);
        }
        self.confine_file_system()
            .map_err(|error| format!("confining its file system with Landlock: {error}"))
    }

    /// Makes the file system read-only (and executable) except for the scratch directory.
    fn confine_file_system(&self) -> Result<FileSystem, String> {
        let open = |path: &Path| {
            PathFd::new(path).map_err(|error| format!("opening {}: {error}", path.display()))
        };
        let ruleset_error = |error: landlock::RulesetError| error.to_string();
        let mut ruleset = Ruleset::default()
            .handle_access(AccessFs::from_all(LANDLOCK_ABI))
            .map_err(ruleset_error)?
            .create()
            .map_err(ruleset_error)?
            .add_rule(PathBeneath::new(
                open(Path::new("/"))?,
                AccessFs::from_read(LANDLOCK_ABI),
            ))
            .map_err(ruleset_error)?;
        // Writing to /dev/null is how much code discards output.
        let writable = self
            .scratch
            .iter()
            .chain(&self.writable)
            .map(PathBuf::as_path);
        for path in writable.chain([Path::new("/dev/null")]) {
            let access = if path.is_dir() {
                AccessFs::from_all(LANDLOCK_ABI)
            } else {
                AccessFs::from_file(LANDLOCK_ABI)
            };
            ruleset = ruleset
                .add_rule(PathBeneath::new(open(path)?, access))
                .map_err(ruleset_error)?;
        }
        let status = ruleset.restrict_self().map_err(ruleset_error)?;
        Ok(match status.ruleset {
            RulesetStatus::FullyEnforced => FileSystem::Confined,
            RulesetStatus::PartiallyEnforced => FileSystem::PartlyConfined,
            RulesetStatus::NotEnforced => FileSystem::Unconfined,
        })
    }

    /// Empties the scratch directory, so that no step finds what an earlier one left; a
    /// directory a step made unreadable or unremovable is given back its permissions first.
    pub fn clear_scratch(&self) {
        let Some(scratch) = &self.scratch else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(scratch) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let removed = if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                std::fs::remove_dir_all(&path).or_else(|_| {
                    restore_permissions(&path);
                    std::fs::remove_dir_all(&path)
                })
            } else {
                std::fs::remove_file(&path)
            };
            if let Err(error) = removed {
                tracing::warn!(%error, path = %path.display(), "emptying the scratch directory");
            }
        }
    }
}

/// Gives the owner back every permission on `path` and everything under it, as far as it can.
fn restore_permissions(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700));
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                restore_permissions(&entry.path());
            }
        }
    }
}

/// Lowers a resource's soft and hard limits to `limit`, unless they are lower already.
fn lower(resource: Resource, limit: u64) -> std::io::Result<()> {
    let (soft, hard) = resource.get()?;
    let hard = hard.min(limit);
    resource.set(soft.min(hard), hard)
}
