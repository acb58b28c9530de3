//! `plumule check` and config errors as the user sees them: exit codes and located messages
//! (SPEC §1, §2, §9 "Names and values"). The many malformed inputs are unit tests beside the
//! config code; these check what reaches the terminal.

mod common;

use std::path::Path;

use common::*;

fn check(sb: &Sandbox, config: &Path) -> Outcome {
    sb.plumule(&["check", "-c", &config.display().to_string()], DEADLINE)
}

/// A config whose line 8 is `line8`, under a valid header and program section.
fn config_with_line_8(sb: &Sandbox, line8: &str) -> std::path::PathBuf {
    let text = format!(
        "{}[program.web]\ncommand = [\"/bin/true\"]\n{line8}\n",
        sb.header()
    );
    assert_eq!(
        text.lines().nth(7),
        Some(line8),
        "the test's own line count"
    );
    sb.write_file("bad.toml", &text, 0o644)
}

#[test]
fn check_locates_errors_by_file_and_line() {
    let sb = Sandbox::new();
    for (line8, also) in [
        ("worker = 2", Some("workers")), // unknown key: suggests the near miss
        ("workers = \"two\"", None),     // wrong type
        ("workers = ", None),            // not TOML
        ("stop_timeout = 10", None),     // a duration must be a string
        ("stop_signal = \"TERN\"", None), // unknown signal
    ] {
        let config = config_with_line_8(&sb, line8);
        let out = check(&sb, &config);
        assert_exit_code(out.status, 1, &out.stderr);
        assert!(
            out.stderr.contains("bad.toml:8"),
            "the error for `{line8}` is located as bad.toml:8:\n{}",
            out.stderr
        );
        if let Some(word) = also {
            assert!(
                out.stderr.contains(word),
                "the error for `{line8}` says {word}:\n{}",
                out.stderr
            );
        }
    }
}

#[test]
fn check_accepts_a_valid_config() {
    let sb = Sandbox::new();
    let config = sb.config(
        "[program.web]\ncommand = [\"/bin/true\"]\nworkers = 2\nrestart = \"on-failure\"\n\
         backoff = { initial = \"100ms\", max = \"1s\", multiplier = 2.0, jitter = 0.0 }\n",
    );
    let out = check(&sb, &config);
    assert_exit_code(out.status, 0, &out.stderr);
    assert!(
        out.stdout.contains("web"),
        "check prints the resolved programs:\n{}",
        out.stdout
    );
}

#[test]
fn check_prints_the_cluster_and_a_queue_backend_without_their_passwords() {
    let sb = Sandbox::new();
    let text = format!(
        "[plumule]\nruntime_dir = {}\nstate_dir = {}\nnode = \"web-7\"\n\
         cluster = {{ etcd = [\"http://127.0.0.1:2379\"], lease = \"4s\" }}\n\n\
         [program.w]\ncommand = [\"/bin/cat\"]\nqueue = \"q\"\n\n\
         [queue.q]\nbackend = \"redis://:hunter2@127.0.0.1:6379/3\"\nroute = \"key\"\n\
         claim_after = \"12s\"\npartitions = 16\n",
        toml_str(&sb.runtime_dir()),
        toml_str(&sb.path("state")),
    );
    // A password in the file: readable by its owner only.
    let config = sb.write_file("plumule.toml", &text, 0o600);
    let out = check(&sb, &config);
    assert_exit_code(out.status, 0, &out.stderr);
    assert!(
        out.stdout
            .contains("cluster     node=web-7 etcd=http://127.0.0.1:2379 lease=4s"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains(
            "route=key max_pending=1000000 backend=redis://***@127.0.0.1:6379/3 \
             claim_after=12s partitions=16 consumed by w"
        ),
        "{}",
        out.stdout
    );
    assert!(
        !out.stdout.contains("hunter2") && !out.stderr.contains("hunter2"),
        "the password never shows:\n{}{}",
        out.stdout,
        out.stderr
    );
}

#[test]
fn run_refuses_an_invalid_config_with_exit_1() {
    let sb = Sandbox::new();
    let script = sb.worker("w.sh", "exec sleep 1000");
    let text = format!(
        "{}[program.web]\ncommand = {}\nworker = 2\n",
        sb.header(),
        argv(&script)
    );
    let config = sb.write_file("bad.toml", &text, 0o644);
    let mut master = sb.start(&config);
    let status = master.wait_exit(DEADLINE);
    assert_exit_code(status, 1, &master.stderr_text());
    assert!(
        sb.starts().is_empty(),
        "no worker started from an invalid config"
    );
}

#[test]
fn a_config_writable_by_others_is_refused() {
    let sb = Sandbox::new();
    let text = format!("{}[program.web]\ncommand = [\"/bin/true\"]\n", sb.header());
    for mode in [0o664, 0o646] {
        let config = sb.write_file("open.toml", &text, mode);
        let out = check(&sb, &config);
        assert_exit_code(out.status, 1, &out.stderr);
        assert!(
            out.stderr.contains("open.toml"),
            "mode {mode:o}: says which file:\n{}",
            out.stderr
        );
    }
}

#[test]
fn a_usage_error_exits_2() {
    let sb = Sandbox::new();
    let out = sb.plumule(&["frobnicate"], DEADLINE);
    assert_exit_code(out.status, 2, &out.stderr);
}

#[test]
fn the_example_config_passes_check() {
    let sb = Sandbox::new();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    assert!(example.exists(), "{} is missing", example.display());
    let out = check(&sb, &example);
    assert_exit_code(out.status, 0, &out.stderr);
}

fn check_args(sb: &Sandbox, config: &Path, more: &[&str]) -> Outcome {
    let config = config.display().to_string();
    let mut args = vec!["check", "-c", &config];
    args.extend_from_slice(more);
    sb.plumule(&args, DEADLINE)
}

/// The lines of `stderr` that report a problem of `file` (`FILE:LINE:…`), in order.
fn located(stderr: &str, file: &Path) -> Vec<String> {
    let prefix = format!("{}:", file.display());
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(str::to_owned)
        .collect()
}

/// Regression (operator experience): four mistakes in one file came out one at a time, each
/// only after the previous one was fixed. Now `check` reports all of them at once.
#[test]
fn check_reports_every_error_of_a_file_at_once() {
    let sb = Sandbox::new();
    let text = format!(
        "{}[program.web]\ncomand = [\"/bin/true\"]\nstop_signal = \"TREM\"\n\
         stop_timeout = 10\nrestart = \"sometimes\"\nworker = 2\nenv = {{ A = \"1\" }}\n\
         backof = {{ initial = \"1s\" }}\n",
        sb.header()
    );
    let config = sb.write_file("bad.toml", &text, 0o644);
    let out = check(&sb, &config);
    assert_exit_code(out.status, 1, &out.stderr);
    assert_eq!(
        located(&out.stderr, &config),
        [
            "7:1: program.web.comand: unknown key `comand`, did you mean `command`?",
            "8:15: program.web.stop_signal: unknown signal `TREM`, did you mean `TERM`?",
            "9:16: program.web.stop_timeout: expected a duration string like \"5s\", found \
             the number 10; write \"10s\"",
            "10:11: program.web.restart: unknown restart policy `sometimes`; expected one of \
             `always`, `on-failure`, `never`",
            "11:1: program.web.worker: unknown key `worker`, did you mean `workers`?",
            "13:1: program.web.backof: unknown key `backof`, did you mean `backoff`?",
        ],
        "stderr:\n{}",
        out.stderr
    );
    assert!(
        out.stdout.is_empty(),
        "nothing resolved is printed: {}",
        out.stdout
    );
}

/// Regression: `umask = 022` (a TOML number with a leading zero) was a bare "expected
/// newline" syntax error with no key and no hint.
#[test]
fn check_says_to_quote_a_umask_written_as_a_number() {
    let sb = Sandbox::new();
    let config = config_with_line_8(&sb, "umask = 022");
    let out = check(&sb, &config);
    assert_exit_code(out.status, 1, &out.stderr);
    assert_eq!(
        located(&out.stderr, &config),
        [
            "8:9: program.web.umask: a number cannot start with 0 in TOML; write the umask as a \
          string: umask = \"022\""
        ],
        "stderr:\n{}",
        out.stderr
    );
    // Other numbers with a leading zero get their fix too, and the rest of the file is
    // still checked.
    let text = format!(
        "{}[program.web]\ncommand = [\"/bin/true\"]\nworkers = 08\nrestart = \"alway\"\n",
        sb.header()
    );
    let config = sb.write_file("zeros.toml", &text, 0o644);
    let out = check(&sb, &config);
    assert_exit_code(out.status, 1, &out.stderr);
    assert_eq!(
        located(&out.stderr, &config),
        [
            "8:11: program.web.workers: a number cannot start with 0 in TOML: write workers = 8",
            "9:11: program.web.restart: unknown restart policy `alway`, did you mean `always`?",
        ],
        "stderr:\n{}",
        out.stderr
    );
}

#[test]
fn check_warns_about_a_missing_command_or_cwd_and_fails_only_with_strict() {
    let sb = Sandbox::new();
    let text = format!(
        "{}[program.web]\ncommand = [\"plumule-no-such-command\"]\n\
         [program.job]\ncommand = [\"/bin/true\"]\ncwd = \"gone\"\n\
         [program.ok]\ncommand = [\"true\"]\n",
        sb.header()
    );
    let config = sb.write_file("warn.toml", &text, 0o644);
    let out = check(&sb, &config);
    assert_exit_code(out.status, 0, &out.stderr);
    assert!(
        out.stdout.contains("web") && out.stdout.contains("job") && out.stdout.contains("ok"),
        "the resolved programs are printed:\n{}",
        out.stdout
    );
    let file = config.display().to_string();
    let warnings: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(warnings.len(), 2, "two warnings:\n{}", out.stderr);
    assert!(
        warnings[0].starts_with(&format!(
            "warning: {file}:7:1: program.web.command: command not found: \
             plumule-no-such-command (searched PATH="
        )),
        "{}",
        out.stderr
    );
    assert_eq!(
        warnings[1],
        format!(
            "warning: {file}:10:1: program.job.cwd: the folder {} does not exist",
            sb.path("gone").display()
        )
    );

    let strict = check_args(&sb, &config, &["--strict"]);
    assert_exit_code(strict.status, 1, &strict.stderr);
    assert_eq!(
        strict
            .stderr
            .lines()
            .filter(|l| l.starts_with("warning: "))
            .count(),
        2,
        "{}",
        strict.stderr
    );
    assert!(
        strict.stderr.contains("2 warnings, refused with --strict"),
        "{}",
        strict.stderr
    );

    // A file that runs here passes --strict.
    let text = format!(
        "{}[program.ok]\ncommand = [\"true\"]\ncwd = \".\"\n",
        sb.header()
    );
    let fine = sb.write_file("fine.toml", &text, 0o644);
    let out = check_args(&sb, &fine, &["--strict"]);
    assert_exit_code(out.status, 0, &out.stderr);
    assert!(out.stderr.is_empty(), "no warning: {}", out.stderr);
}

#[test]
fn check_warns_about_user_and_group_when_not_root() {
    let sb = Sandbox::new();
    let text = format!(
        "{}[program.web]\ncommand = [\"/bin/true\"]\nuser = \"root\"\ngroup = \"root\"\n",
        sb.header()
    );
    let config = sb.write_file("users.toml", &text, 0o644);
    let file = config.display().to_string();
    // As root the test runs `check` as nobody (65534); as an ordinary user, as itself.
    let root = nix::unistd::geteuid().is_root();
    let (uid, gid) = if root {
        (65534, 65534)
    } else {
        (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        )
    };
    let not_root = |args: &[&str]| {
        let mut all = vec!["check", "-c", &file];
        all.extend_from_slice(args);
        if !root {
            return sb.plumule(&all, DEADLINE);
        }
        let mut d = sb.spawn_plumule_as(&all, uid, gid);
        let status = d.wait_exit(DEADLINE);
        Outcome {
            status,
            stdout: d.stdout_text(),
            stderr: d.stderr_text(),
        }
    };
    let out = not_root(&[]);
    assert_exit_code(out.status, 0, &out.stderr);
    assert_eq!(
        out.stderr.lines().collect::<Vec<_>>(),
        [
            format!(
                "warning: {file}:8:1: program.web.user: plumule is not running as root (uid \
                 {uid}): it cannot start workers as user `root`"
            ),
            format!(
                "warning: {file}:9:1: program.web.group: plumule is not running as root (gid \
                 {gid}): it cannot start workers in group `root`"
            ),
        ]
    );
    let strict = not_root(&["--strict"]);
    assert_exit_code(strict.status, 1, &strict.stderr);
    if root {
        // As root, the same file has nothing to warn about.
        let out = check_args(&sb, &config, &["--strict"]);
        assert_exit_code(out.status, 0, &out.stderr);
    }
}

/// Issue 14: what a config may ask for is bounded, and `check` says which limit, where.
#[test]
fn check_names_the_limit_a_config_crosses() {
    let sb = Sandbox::new();
    let big = "v".repeat(200 * 1024);
    for (line8, limit) in [
        (
            "stop_timeout = \"99999999999999h\"",
            "longer than the limit of 10years",
        ),
        ("workers = 20000", "must be between 0 and 10000"),
        (
            &format!("env = {{ BIG = \"{big}\" }}") as &str,
            "above the limit of 131071 bytes",
        ),
    ] {
        let config = config_with_line_8(&sb, line8);
        let out = check(&sb, &config);
        assert_exit_code(out.status, 1, &out.stderr);
        let located = out
            .stderr
            .lines()
            .find(|l| l.contains("bad.toml:8:") && l.contains(limit));
        assert!(
            located.is_some(),
            "`{}` is refused at bad.toml:8 naming the limit ({limit}):\n{}",
            &line8[..line8.len().min(40)],
            &out.stderr[..out.stderr.len().min(2000)]
        );
    }
    let programs: String = (0..11)
        .map(|i| format!("[program.p{i:02}]\ncommand = [\"/bin/true\"]\nworkers = 10000\n"))
        .collect();
    let config = sb.write_file("many.toml", &format!("{}{programs}", sb.header()), 0o644);
    let out = check(&sb, &config);
    assert_exit_code(out.status, 1, &out.stderr);
    assert!(
        out.stderr
            .contains("program.p10.workers: the programs ask for 110000 workers in all, above the limit of 100000 workers across all programs"),
        "{}",
        out.stderr
    );
}
