//! One master per runtime dir: the pidfile and its lock, and what a new master does with the
//! workers a killed one left behind (SPEC §1 exit codes, §5, §9 "Orphans").

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn wait_pidfile(sb: &Sandbox, master: &Daemon) {
    let expected = format!("{}\n", master.pid());
    sb.wait(
        "the pidfile holds the master's pid and a newline",
        DEADLINE,
        || fs::read_to_string(sb.pidfile()).is_ok_and(|text| text == expected),
    );
}

#[test]
fn the_pidfile_names_the_master_and_is_removed_by_a_graceful_stop() {
    let sb = Sandbox::new();
    let script = sb.worker("w.sh", "exec sleep 1000");
    let config = sb.config(&format!("[program.w]\ncommand = {}\n", argv(&script)));
    let mut master = sb.start(&config);

    sb.wait_starts("w", 1, DEADLINE);
    wait_pidfile(&sb, &master);
    let status = master.stop_with(SIGTERM, DEADLINE);
    assert_exit_code(status, 0, &master.stderr_text());
    assert!(
        !sb.pidfile().exists(),
        "the pidfile is removed on a graceful stop"
    );
}

#[test]
fn a_second_master_on_the_same_runtime_dir_exits_3_naming_the_first() {
    let sb = Sandbox::new();
    let script = sb.worker("w.sh", "exec sleep 1000");
    let config = sb.config(&format!("[program.w]\ncommand = {}\n", argv(&script)));
    let mut first = sb.start(&config);
    let worker = sb.wait_starts("w", 1, DEADLINE)[0].pid;
    wait_pidfile(&sb, &first);

    let mut second = sb.start(&config);
    let status = second.wait_exit(DEADLINE);
    let stderr = second.stderr_text();
    assert_exit_code(status, 3, &stderr);
    assert!(
        stderr.contains(&first.pid().to_string()),
        "the refusal names the running master's pid {}:\n{stderr}",
        first.pid()
    );

    assert!(first.running(), "the first master is unaffected");
    assert!(pid_alive(worker), "the first master's worker is unaffected");
    assert_eq!(
        sb.starts_of("w").len(),
        1,
        "the second master started no worker"
    );
    wait_pidfile(&sb, &first);
    let status = first.stop_with(SIGTERM, DEADLINE);
    assert_exit_code(status, 0, &first.stderr_text());
}

#[test]
fn a_new_master_kills_the_orphans_of_a_killed_one_before_starting_workers() {
    let sb = Sandbox::new();
    let orphan_file = sb.path("orphan.pid");
    // Ignores SIGTERM, so it outlives a SIGKILLed master; so does its own child, in its group.
    // At start it notes whether the orphan named in orphan.pid (if any) is still alive.
    let script = sb.worker(
        "stubborn.sh",
        &format!(
            r#"trap '' TERM
orphan=$(cat {orphan} 2>/dev/null)
if [ -n "$orphan" ] && read -r stat 2>/dev/null < /proc/$orphan/stat; then
    set -- ${{stat##*)}}
    [ "$1" = Z ] || echo "$$ started while orphan $orphan was alive" >> {seen}
fi
sleep 1000 &
echo $! > {dir}/grandchild.$$
wait"#,
            orphan = sh_str(&orphan_file),
            seen = sh_str(&sb.path("orphan-seen")),
            dir = sh_str(sb.root()),
        ),
    );
    let config = sb.config(&format!(
        "[program.stubborn]\ncommand = {}\nstop_timeout = \"500ms\"\n",
        argv(&script)
    ));

    let mut first = sb.start(&config);
    let orphan = sb.wait_starts("stubborn", 1, DEADLINE)[0].pid;
    let grandchild: i32 = sb
        .wait_line(&format!("grandchild.{orphan}"), DEADLINE)
        .parse()
        .expect("a pid");
    first.signal(SIGKILL);
    first.wait_exit(DEADLINE);
    assert!(
        pid_alive(orphan) && pid_alive(grandchild),
        "premise: a worker ignoring SIGTERM outlives its killed master"
    );
    fs::write(&orphan_file, format!("{orphan}\n")).expect("write orphan.pid");

    let mut second = sb.start(&config);
    sb.wait("the orphan's process group is gone", DEADLINE, || {
        group_members(orphan).is_empty()
    });
    let starts = sb.wait_starts("stubborn", 2, DEADLINE);
    assert_ne!(starts[1].pid, orphan);
    let seen = fs::read_to_string(sb.path("orphan-seen")).unwrap_or_default();
    assert!(
        seen.is_empty(),
        "the new master started a worker beside the orphan: {seen}"
    );
    assert!(!pid_alive(grandchild), "the orphan's child is gone too");

    let status = second.stop_with(SIGTERM, DEADLINE);
    assert_exit_code(status, 0, &second.stderr_text());
}

// ---------------------------------------------------------------------------------------------
// The per-user folder in /tmp (issue 14)

/// `/tmp/plumule-UID` for a uid of this test only (no account needed: nothing looks it up), so
/// that concurrent runs of the suite never share the folder; removed on drop.
struct TmpFolder {
    uid: u32,
    path: PathBuf,
}

impl TmpFolder {
    fn new(salt: u32) -> TmpFolder {
        let uid = 40_000 + (std::process::id() % 10_000) * 2 + salt;
        let path = PathBuf::from(format!("/tmp/plumule-{uid}"));
        let _ = fs::remove_dir_all(&path);
        TmpFolder { uid, path }
    }
}

impl Drop for TmpFolder {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// `plumule ARGS…` as `uid` with no folder variables, so the defaults fall back to /tmp.
fn plumule_as(sb: &Sandbox, uid: u32, args: &[&str]) -> (i32, String) {
    let binary = sb.plumule_for_others();
    let mut d = sb.spawn_master_via(
        &binary.display().to_string(),
        args,
        &format!("plumule {} (uid {uid})", args.join(" ")),
        |cmd: &mut Command| {
            cmd.uid(uid).gid(uid).env("HOME", "/nonexistent");
            for var in [
                "XDG_RUNTIME_DIR",
                "XDG_STATE_HOME",
                "RUNTIME_DIRECTORY",
                "STATE_DIRECTORY",
            ] {
                cmd.env_remove(var);
            }
        },
    );
    let status = d.wait_exit(DEADLINE);
    (status.code().unwrap_or(-1), d.stderr_text())
}

fn chown(path: &Path, uid: u32) {
    nix::unistd::chown(
        path,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(uid)),
    )
    .expect("chown");
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

#[test]
fn the_per_user_tmp_folder_is_refused_when_another_user_made_it_or_others_can_write_it() {
    if !root_or_skip("creates a folder in /tmp as another user") {
        return;
    }
    let sb = Sandbox::new();
    // No runtime_dir: the default applies.
    let config = sb.write_file(
        "plumule.toml",
        "[program.w]\ncommand = \"sleep 1\"\n",
        0o644,
    );
    let config = config.display().to_string();
    let folder = TmpFolder::new(0);
    let uid = folder.uid;

    // Made beforehand by someone else (root here), open to all, as an attacker would.
    fs::create_dir(&folder.path).expect("create the folder");
    chmod(&folder.path, 0o777);
    let (code, stderr) = plumule_as(&sb, uid, &["check", "-c", &config]);
    assert_eq!(code, 1, "check refuses it:\n{stderr}");
    let expected = format!(
        "plumule.runtime_dir: refusing the per-user folder {}: it belongs to uid 0, not to you \
         (uid {uid})",
        folder.path.display()
    );
    assert!(
        stderr.contains(&expected) && stderr.contains("remove it"),
        "the message names the folder, the owner and the fix:\n{stderr}"
    );
    // `run` refuses it too, before creating anything in it.
    let (code, stderr) = plumule_as(&sb, uid, &["run", "-c", &config]);
    assert_eq!(code, 1, "run refuses it:\n{stderr}");
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(
        !folder.path.join("run").exists(),
        "nothing was created in the folder"
    );

    // Ours, but writable by others.
    chown(&folder.path, uid);
    let (code, stderr) = plumule_as(&sb, uid, &["check", "-c", &config]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("others may write to it (mode 0777)")
            && stderr.contains(&format!("chmod go-w {}", folder.path.display())),
        "{stderr}"
    );

    // Fixed as the message says.
    chmod(&folder.path, 0o755);
    let (code, stderr) = plumule_as(&sb, uid, &["check", "-c", &config]);
    assert_eq!(code, 0, "a private folder of ours is accepted:\n{stderr}");
}

#[test]
fn a_missing_per_user_tmp_folder_is_created_private() {
    if !root_or_skip("runs plumule as another user") {
        return;
    }
    let sb = Sandbox::new();
    let config = sb.write_file(
        "plumule.toml",
        "[program.w]\ncommand = \"sleep 1\"\n",
        0o644,
    );
    let folder = TmpFolder::new(1);
    let (code, stderr) = plumule_as(
        &sb,
        folder.uid,
        &["check", "-c", &config.display().to_string()],
    );
    assert_eq!(code, 0, "{stderr}");
    let meta = fs::symlink_metadata(&folder.path).expect("the folder was created");
    assert!(meta.is_dir());
    assert_eq!(meta.uid(), folder.uid, "it belongs to the user");
    assert_eq!(meta.mode() & 0o777, 0o700, "only the user may enter it");
}
