//! How a worker is started: from a program's settings and a worker id to a spawn request
//! (the executable found in PATH, the environment, the credentials, the locks). No process
//! is created here; [`crate::sys::spawn`] does that.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::config::{CommandSpec, Limit, LimitResource, Program};
use crate::locks;
use crate::sys::spawn::{cstring, Body, Credentials, LockRequest, ResourceLimit, Setup, Stage};

/// The PATH a worker gets when it inherits none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Variables of the master's environment that describe the master itself, never a worker:
/// the systemd protocol ones ([`crate::config::SYSTEMD_ENV`]) and `JOURNAL_STREAM` (a worker's
/// output goes through plumule, not straight to the journal).
fn master_only(name: &OsStr) -> bool {
    name == "JOURNAL_STREAM" || crate::config::SYSTEMD_ENV.iter().any(|v| name == *v)
}

/// What the master knows that every spawn needs.
#[derive(Debug, Clone)]
pub struct Context {
    pub lock_dir: PathBuf,
    pub lock_mode: libc::mode_t,
    pub nofile: Option<libc::rlimit>,
    /// plumule's own notify socket for workers, once it exists.
    pub notify_socket: Option<PathBuf>,
    /// The wire of each queue, by name: what a consumer is told in its environment.
    pub queues: Vec<(String, crate::config::QueueProtocol, u64)>,
}

/// A worker's set-up with its stdio and descriptors still to be filled in, its exec body,
/// and the lock names in the order the child takes them (its reports name locks by index).
#[derive(Debug)]
pub struct Prepared {
    pub setup: Setup,
    pub body: Body<'static>,
    pub lock_names: Vec<String>,
    /// The cluster locks, in the order they are taken (by name), after the file locks in
    /// `lock_names`. When there are any, `setup.gate` waits for them (its descriptor still
    /// to be filled in).
    pub cluster_locks: Vec<String>,
}

/// Why a worker cannot be started at all; the text is what `status` shows.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("cannot execute {name}: it is a directory")]
    IsDirectory { name: String },
    #[error("cannot execute {name}: not executable")]
    NotExecutable { name: String },
    #[error("cannot execute {name}: {source}")]
    Unreadable { name: String, source: io::Error },
    #[error("command not found: {name} (searched PATH={path})")]
    NotFound { name: String, path: String },
    #[error("cannot list the groups of user {user}: {source}")]
    Groups { user: String, source: io::Error },
}

/// Prepares worker `id` of `program` (which runs `workers` workers).
pub fn prepare(
    program: &Program,
    id: u32,
    workers: u32,
    ctx: &Context,
) -> Result<Prepared, PrepareError> {
    let env = environment(program, id, workers, ctx);
    let argv: Vec<String> = match &program.command {
        CommandSpec::Argv(argv) => argv.clone(),
        CommandSpec::Shell(line) => vec!["/bin/sh".into(), "-c".into(), line.clone()],
        // A library service: no executable to find (see the body below).
        CommandSpec::Function(_) => vec![String::new()],
    };
    let path_var = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| DEFAULT_PATH.into());
    let exe = match &program.command {
        CommandSpec::Function(_) => PathBuf::new(),
        _ => resolve(&argv[0], &path_var, program.cwd.as_deref())?,
    };

    let mut locks: Vec<(String, bool)> = program
        .locks
        .iter()
        .filter(|l| !l.cluster)
        .map(|l| (locks::expand(&l.name, id), l.shared))
        .collect();
    let mut cluster_locks: Vec<String> = program
        .locks
        .iter()
        .filter(|l| l.cluster)
        .map(|l| locks::expand(&l.name, id))
        .collect();
    cluster_locks.sort();
    locks::acquisition_order(&mut locks);
    let lock_requests = locks
        .iter()
        .map(|(name, shared)| LockRequest {
            path: cstring(
                locks::lock_path(&ctx.lock_dir, name)
                    .into_os_string()
                    .as_bytes(),
            ),
            shared: *shared,
        })
        .collect();

    let setup = Setup {
        cwd: program
            .cwd
            .as_ref()
            .map(|c| cstring(c.as_os_str().as_bytes())),
        umask: program.umask.map(|m| m as libc::mode_t),
        credentials: credentials(program)?,
        stdin: -1,
        stdout: -1,
        stderr: -1,
        pass_fds: Vec::new(),
        locks: lock_requests,
        lock_mode: ctx.lock_mode,
        nofile: ctx.nofile,
        limits: program.limits.iter().map(resource_limit).collect(),
        nice: program.nice,
        oom_score_adj: program.oom_score_adj,
        gate: None,
    };
    // A lock's revision is plumule's to give: the program's own value of it is dropped.
    let rev_vars: Vec<String> = cluster_locks
        .iter()
        .map(|n| crate::cluster::revision_var(n))
        .collect();
    let kept: Vec<&(OsString, OsString)> = env
        .iter()
        .filter(|(k, _)| !rev_vars.iter().any(|r| k == r.as_str()))
        .collect();
    let pid_vars = kept
        .iter()
        .enumerate()
        .filter(|(_, (k, _))| k == "WATCHDOG_PID" || k == "LISTEN_PID")
        .map(|(i, _)| i)
        .collect();
    let mut envp: Vec<CString> = kept
        .iter()
        .map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            cstring(kv)
        })
        .collect();
    // Each cluster lock's revision, completed in the child once the lock is its.
    let mut setup = setup;
    if !cluster_locks.is_empty() {
        let first = envp.len();
        envp.extend(rev_vars.iter().map(|v| cstring(format!("{v}="))));
        setup.gate = Some(crate::sys::spawn::Gate {
            fd: -1,
            lock: locks.len() as u16,
            env: (first..envp.len()).collect(),
        });
    }
    let body = Body::Exec {
        path: cstring(exe.into_os_string().as_bytes()),
        argv: argv.into_iter().map(cstring).collect(),
        envp,
        pid_vars,
    };
    // A library service runs its function in the forked child, without exec.
    let body = match &program.command {
        CommandSpec::Function(f) => {
            let f = std::sync::Arc::clone(&f.0);
            Body::Call(Box::new(move || {
                // The environment an exec'd worker gets (plumule's NOTIFY_SOCKET, never the
                // master's; PLUMULE_*), set in the child, which has only this thread.
                let pid = std::process::id().to_string();
                for (k, _) in std::env::vars_os() {
                    std::env::remove_var(k);
                }
                for (k, v) in &env {
                    let pid_var = k == "WATCHDOG_PID" || k == "LISTEN_PID";
                    std::env::set_var(k, if pid_var { pid.as_ref() } else { v.as_os_str() });
                }
                f(id, workers)
            }))
        }
        _ => body,
    };
    let mut lock_names: Vec<String> = locks.into_iter().map(|(n, _)| n).collect();
    lock_names.extend(cluster_locks.iter().cloned());
    Ok(Prepared {
        setup,
        body,
        lock_names,
        cluster_locks,
    })
}

/// The setrlimit(2) call for a `limits` entry: soft and hard limit both at the value.
fn resource_limit(limit: &Limit) -> ResourceLimit {
    let resource = match limit.resource {
        LimitResource::As => libc::RLIMIT_AS,
        LimitResource::Core => libc::RLIMIT_CORE,
        LimitResource::Memlock => libc::RLIMIT_MEMLOCK,
        LimitResource::Nofile => libc::RLIMIT_NOFILE,
        LimitResource::Nproc => libc::RLIMIT_NPROC,
    };
    let value = limit.value.unwrap_or(libc::RLIM_INFINITY as _);
    ResourceLimit {
        resource: resource as _,
        cur: value,
        max: value,
    }
}

/// What `status` shows when the child could not set a `limits` entry, `nice` or
/// `oom_score_adj` ([`Stage::Limit`], [`Stage::Nice`], [`Stage::OomScoreAdj`]); `None` for
/// the other stages. `why` is the errno's text.
pub fn describe_shaping_failure(program: &Program, stage: Stage, why: &str) -> Option<String> {
    let shown = |v: Option<i32>| v.map_or("?".to_owned(), |v| v.to_string());
    Some(match stage {
        Stage::Limit(i) => match program.limits.get(usize::from(i)) {
            Some(Limit {
                resource,
                value: Some(v),
            }) => format!("cannot set limit {} to {v}: {why}", resource.name()),
            Some(Limit {
                resource,
                value: None,
            }) => format!("cannot set limit {} to unlimited: {why}", resource.name()),
            None => format!("cannot set a resource limit: {why}"),
        },
        Stage::Nice => format!("cannot set nice to {}: {why}", shown(program.nice)),
        Stage::OomScoreAdj => format!(
            "cannot set oom_score_adj to {}: {why}",
            shown(program.oom_score_adj)
        ),
        Stage::Setup | Stage::Chdir | Stage::Lock(_) | Stage::Credentials | Stage::Exec => {
            return None
        }
    })
}

/// The worker's environment, in a stable order.
pub fn environment(
    program: &Program,
    id: u32,
    workers: u32,
    ctx: &Context,
) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = Vec::new();
    let set = |env: &mut Vec<(OsString, OsString)>, k: &OsStr, v: &OsStr| match env
        .iter_mut()
        .find(|(key, _)| key == k)
    {
        Some(entry) => entry.1 = v.to_os_string(),
        None => env.push((k.to_os_string(), v.to_os_string())),
    };
    if program.inherit_env {
        for (k, v) in std::env::vars_os() {
            if !master_only(&k) {
                env.push((k, v));
            }
        }
    } else {
        let (home, name, shell) = match &program.user {
            Some(u) => (u.home.clone(), u.name.clone(), u.shell.clone()),
            None => own_user(),
        };
        set(&mut env, "PATH".as_ref(), DEFAULT_PATH.as_ref());
        set(&mut env, "HOME".as_ref(), home.as_os_str());
        set(&mut env, "USER".as_ref(), name.as_ref());
        set(&mut env, "LOGNAME".as_ref(), name.as_ref());
        set(&mut env, "SHELL".as_ref(), shell.as_os_str());
    }
    for (k, v) in &program.env {
        set(&mut env, k.as_ref(), v.as_ref());
    }
    if let Some(sock) = &ctx.notify_socket {
        set(&mut env, "NOTIFY_SOCKET".as_ref(), sock.as_os_str());
    }
    if !program.listen.is_empty() {
        let names: Vec<&str> = program.listen.iter().map(|l| l.name.as_str()).collect();
        set(
            &mut env,
            "LISTEN_FDS".as_ref(),
            program.listen.len().to_string().as_ref(),
        );
        set(
            &mut env,
            "LISTEN_FDNAMES".as_ref(),
            names.join(":").as_ref(),
        );
        // The worker's own pid, written by the child after fork.
        set(&mut env, "LISTEN_PID".as_ref(), "0".as_ref());
    }
    if let Some(w) = program.watchdog {
        set(
            &mut env,
            "WATCHDOG_USEC".as_ref(),
            w.as_micros().to_string().as_ref(),
        );
        // The value is the worker's own pid, written by the child after fork.
        set(&mut env, "WATCHDOG_PID".as_ref(), "0".as_ref());
    }
    if let Some((name, protocol, max_frame)) = program
        .queue
        .as_ref()
        .and_then(|q| ctx.queues.iter().find(|(n, _, _)| n == q))
    {
        set(&mut env, "PLUMULE_QUEUE".as_ref(), name.as_ref());
        let protocol = match protocol {
            crate::config::QueueProtocol::Lines => "lines",
            crate::config::QueueProtocol::Frames => "frames",
        };
        set(
            &mut env,
            crate::worker::PROTOCOL_ENV.as_ref(),
            protocol.as_ref(),
        );
        set(
            &mut env,
            crate::worker::MAX_FRAME_ENV.as_ref(),
            max_frame.to_string().as_ref(),
        );
    }
    set(&mut env, "PLUMULE_PROGRAM".as_ref(), program.name.as_ref());
    set(
        &mut env,
        "PLUMULE_WORKER_ID".as_ref(),
        id.to_string().as_ref(),
    );
    set(
        &mut env,
        "PLUMULE_WORKERS".as_ref(),
        workers.to_string().as_ref(),
    );
    env
}

fn own_user() -> (PathBuf, String, PathBuf) {
    match nix::unistd::User::from_uid(nix::unistd::geteuid()) {
        Ok(Some(u)) => (u.dir, u.name, u.shell),
        _ => (
            PathBuf::from("/"),
            nix::unistd::geteuid().to_string(),
            PathBuf::from("/bin/sh"),
        ),
    }
}

/// Finds the executable: a path with a slash is taken as it is (relative to `cwd`), a bare
/// name is looked up in `path_var`.
pub fn resolve(name: &str, path_var: &OsStr, cwd: Option<&Path>) -> Result<PathBuf, PrepareError> {
    if name.contains('/') {
        let p = Path::new(name);
        let full = match cwd {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p.to_path_buf(),
        };
        let name = name.to_string();
        return match std::fs::metadata(&full) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(p.to_path_buf()),
            Ok(m) if m.is_dir() => Err(PrepareError::IsDirectory { name }),
            Ok(_) => Err(PrepareError::NotExecutable { name }),
            Err(source) => Err(PrepareError::Unreadable { name, source }),
        };
    }
    for dir in std::env::split_paths(path_var) {
        let candidate = dir.join(name);
        if let Ok(m) = std::fs::metadata(&candidate) {
            if m.is_file() && m.permissions().mode() & 0o111 != 0 {
                return Ok(candidate);
            }
        }
    }
    Err(PrepareError::NotFound {
        name: name.to_string(),
        path: path_var.to_string_lossy().into_owned(),
    })
}

/// The credentials to switch to, or None when the master already runs as them.
fn credentials(program: &Program) -> Result<Option<Credentials>, PrepareError> {
    let euid = nix::unistd::geteuid().as_raw();
    let egid = nix::unistd::getegid().as_raw();
    let uid = program.user.as_ref().map_or(euid, |u| u.uid);
    let gid = program
        .group
        .as_ref()
        .map(|g| g.gid)
        .or(program.user.as_ref().map(|u| u.gid));
    let gid = gid.unwrap_or(egid);
    if uid == euid && gid == egid && (program.user.is_none() || euid != 0) {
        return Ok(None);
    }
    let groups = match &program.user {
        Some(u) => {
            let groups_of = |source: io::Error| PrepareError::Groups {
                user: u.name.clone(),
                source,
            };
            let name = CString::new(u.name.clone())
                .map_err(|e| groups_of(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
            nix::unistd::getgrouplist(&name, nix::unistd::Gid::from_raw(gid))
                .map_err(|e| groups_of(e.into()))?
                .into_iter()
                .map(|g| g.as_raw())
                .collect()
        }
        None => vec![gid],
    };
    Ok(Some(Credentials { uid, gid, groups }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::program;

    fn ctx() -> Context {
        Context {
            lock_dir: "/run/x/locks".into(),
            lock_mode: 0o644,
            nofile: None,
            notify_socket: None,
            queues: Vec::new(),
        }
    }

    #[test]
    fn bare_names_are_found_in_path_and_missing_ones_are_reported() {
        let found = resolve("sh", OsStr::new("/nonexistent:/bin:/usr/bin"), None).unwrap();
        assert!(found.ends_with("sh") && found.is_absolute(), "{found:?}");
        let err = resolve("no-such-command-xyz", OsStr::new("/bin"), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("command not found: no-such-command-xyz"),
            "{err}"
        );
        let err = resolve("/nonexistent/x", OsStr::new("/bin"), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/nonexistent/x") && err.contains("No such file"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "data").unwrap();
        let err = resolve(plain.to_str().unwrap(), OsStr::new("/bin"), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not executable"), "{err}");
    }

    #[test]
    fn environment_carries_identity_and_drops_the_masters_own_variables() {
        let mut p = program("web", 3);
        p.inherit_env = false;
        p.env.insert("RUST_LOG".into(), "info".into());
        let env = environment(&p, 2, 3, &ctx());
        let get = |k: &str| {
            env.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.to_str().unwrap().to_string())
        };
        assert_eq!(get("PLUMULE_PROGRAM").as_deref(), Some("web"));
        assert_eq!(get("PLUMULE_WORKER_ID").as_deref(), Some("2"));
        assert_eq!(get("PLUMULE_WORKERS").as_deref(), Some("3"));
        assert_eq!(get("RUST_LOG").as_deref(), Some("info"));
        assert_eq!(get("PATH").as_deref(), Some(DEFAULT_PATH));
        assert!(get("HOME").is_some() && get("USER").is_some() && get("SHELL").is_some());
        assert_eq!(get("NOTIFY_SOCKET"), None);
    }

    #[test]
    fn shell_strings_run_through_sh_and_locks_are_ordered() {
        let mut p = program("web", 1);
        p.command = CommandSpec::Shell("echo hi".into());
        p.locks = vec![
            crate::config::LockSpec {
                name: "z-{worker}".into(),
                shared: false,
                cluster: false,
            },
            crate::config::LockSpec {
                name: "a".into(),
                shared: true,
                cluster: false,
            },
        ];
        let prep = prepare(&p, 4, 1, &ctx()).unwrap();
        let Body::Exec { argv, .. } = &prep.body else {
            panic!("a worker execs its command: {:?}", prep.body)
        };
        let argv: Vec<_> = argv.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(argv, ["/bin/sh", "-c", "echo hi"]);
        assert_eq!(prep.lock_names, ["a", "z-4"]);
        assert_eq!(
            prep.setup.locks[1].path.to_str().unwrap(),
            "/run/x/locks/z-4.lock"
        );
    }
}
