//! What `plumule check` warns about: a valid file that cannot run as written on this host. A
//! command that is not found or not executable, a `cwd` that is missing, a `user` or `group`
//! that a master not running as root cannot switch to. These are not errors: the file may be
//! meant for another host (or for after a deploy), so only `check --strict` fails on them.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::path::{Path, PathBuf};

use super::locate::{display_path, Source};
use super::{CommandSpec, Config, Problem};

/// What the warnings need to know about the host where the master would run.
pub struct Probe<'a> {
    pub euid: u32,
    pub egid: u32,
    /// The PATH of the master itself, which a worker with `inherit_env` gets (`None`: unset).
    pub inherited_path: Option<OsString>,
    /// The PATH of a worker that gets none otherwise.
    pub default_path: &'a OsStr,
    /// Finds a command's executable as the master does when it starts a worker: the program
    /// name, the worker's PATH, its `cwd`; why it cannot when it cannot.
    #[allow(clippy::type_complexity)]
    pub resolve: &'a dyn Fn(&str, &OsStr, Option<&Path>) -> Result<(), String>,
}

/// The warnings about a valid file, each located like a [`super::ConfigError`]'s problems.
///
/// Displayed one per line as `warning: FILE:LINE:COL: KEY: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warnings {
    /// The file (absolute).
    pub path: PathBuf,
    /// Sorted by location; may be empty.
    pub problems: Vec<Problem>,
}

impl Warnings {
    pub fn is_empty(&self) -> bool {
        self.problems.is_empty()
    }
}

impl fmt::Display for Warnings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "warning: ")?;
            super::write_problem(f, &self.path, problem)?;
        }
        Ok(())
    }
}

/// The warnings about `config`, read from `files` (each file's path and content, the main
/// one first, for locations).
pub(super) fn warnings(config: &Config, files: &[(PathBuf, String)], probe: &Probe) -> Warnings {
    let sources: Vec<Source> = files.iter().map(|(_, text)| Source::new(text)).collect();
    let mut problems = Vec::new();
    for p in &config.programs {
        // The file that defines the program.
        let index = sources
            .iter()
            .position(|s| s.key_span(&["program", &p.name]).is_some())
            .unwrap_or(0);
        let source = &sources[index];
        let file = (index > 0).then(|| files[index].0.clone());
        let mut warn = |key: &str, message: String| {
            let path = ["program", p.name.as_str(), key];
            // Located at the key, else at its program (a group brought by `user`).
            let span = source
                .key_span(&path)
                .or_else(|| source.key_span(&path[..2]));
            problems.push(Problem {
                file: file.clone(),
                location: span.map(|s| source.location(s.start)),
                key: Some(display_path(&path)),
                message,
            });
        };
        let cwd_usable = match &p.cwd {
            None => true,
            Some(cwd) => match std::fs::metadata(cwd) {
                Ok(m) if m.is_dir() => true,
                Ok(_) => {
                    warn("cwd", format!("{} is not a folder", cwd.display()));
                    false
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    warn(
                        "cwd",
                        format!("the folder {} does not exist", cwd.display()),
                    );
                    false
                }
                Err(e) => {
                    warn("cwd", format!("cannot use {}: {e}", cwd.display()));
                    false
                }
            },
        };
        let program = match &p.command {
            CommandSpec::Argv(argv) => argv.first().map_or("", String::as_str),
            CommandSpec::Shell(_) => "/bin/sh",
            CommandSpec::Function(_) => continue,
        };
        // The PATH the master gives the worker (launch::environment).
        let path_var: OsString = match p.env.get("PATH") {
            Some(path) => path.into(),
            None if p.inherit_env => probe
                .inherited_path
                .clone()
                .unwrap_or_else(|| probe.default_path.to_os_string()),
            None => probe.default_path.to_os_string(),
        };
        let cwd = p.cwd.as_deref().filter(|_| cwd_usable);
        if let Err(why) = (probe.resolve)(program, &path_var, cwd) {
            warn("command", why);
        }
        if probe.euid != 0 {
            if let Some(user) = p.user.as_ref().filter(|u| u.uid != probe.euid) {
                warn(
                    "user",
                    format!(
                        "plumule is not running as root (uid {}): it cannot start workers \
                         as user `{}`",
                        probe.euid, user.name
                    ),
                );
            }
            let group_set = source.key_span(&["program", &p.name, "group"]).is_some();
            if let Some(group) = p
                .group
                .as_ref()
                .filter(|g| group_set && g.gid != probe.egid)
            {
                warn(
                    "group",
                    format!(
                        "plumule is not running as root (gid {}): it cannot start workers \
                         in group `{}`",
                        probe.egid, group.name
                    ),
                );
            }
        }
    }
    // Endpoints the etcd client refuses (a user: no etcd authentication): valid per the
    // contract, but the master would stay out of the cluster.
    if let Some(cluster) = &config.cluster {
        let source = &sources[0];
        let path = ["plumule", "cluster", "etcd"];
        let span = source
            .key_span(&path)
            .or_else(|| source.key_span(&path[..2]));
        for url in &cluster.etcd {
            if let Err(why) = crate::cluster::etcd::check_endpoint(url) {
                problems.push(Problem {
                    file: None,
                    location: span.clone().map(|s| source.location(s.start)),
                    key: Some(display_path(&path)),
                    message: format!("{why}; this master would stay out of the cluster"),
                });
            }
        }
    }
    problems.sort_by_key(|p| (p.file.clone(), p.location.is_none(), p.location));
    Warnings {
        path: config.path.clone(),
        problems,
    }
}
