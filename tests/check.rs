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
