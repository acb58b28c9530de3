//! What the command line tells its users: `--help`, the man page, the completion scripts
//! (SPEC §1). Every command they show works and every argument says what it does; a command
//! that parsed but was not built yet would be hidden from all three (none is today).

mod common;

use clap::CommandFactory;

use common::*;

/// The commands that parse but are not built yet. When one is built, it leaves this list
/// and its `hide = true`.
const NOT_BUILT: &[&str] = &[];

/// The queue commands, the last ones to leave [`NOT_BUILT`].
const QUEUE_COMMANDS: &[&str] = &["submit", "queue", "requeue"];

fn cli() -> clap::Command {
    let mut cmd = plumule::cli::Cli::command();
    // Built, as the binary sees it: global options propagated, --help and --version added.
    cmd.build();
    cmd
}

fn shown_commands() -> Vec<String> {
    cli()
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        .map(|s| s.get_name().to_owned())
        .collect()
}

/// Whether `text` holds `word` with no letter, digit or `-` right before or after it (so
/// `queue` is not found in `queues` or `requeue`, but is in `plumule__queue` or `'queue:`).
fn has_word(text: &str, word: &str) -> bool {
    let part = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-');
    text.match_indices(word).any(|(at, _)| {
        !part(text[..at].chars().next_back()) && !part(text[at + word.len()..].chars().next())
    })
}

/// The roff of section `name`: from its `.SH` line to the next one.
fn section<'a>(roff: &'a str, name: &str) -> &'a str {
    let start = roff
        .find(&format!(".SH {name}\n"))
        .unwrap_or_else(|| panic!("no section {name}"));
    let rest = &roff[start + 4..];
    &rest[..rest.find("\n.SH ").unwrap_or(rest.len())]
}

fn run_ok(sb: &Sandbox, args: &[&str]) -> Outcome {
    let out = sb.plumule(args, DEADLINE);
    assert_exit_code(out.status, 0, &out.stderr);
    out
}

#[test]
fn every_shown_command_and_argument_is_described() {
    let cmd = cli();
    let mut problems = Vec::new();
    for arg in cmd.get_arguments() {
        if arg
            .get_help()
            .is_none_or(|h| h.to_string().trim().is_empty())
        {
            problems.push(format!("plumule: argument `{}` has no help", arg.get_id()));
        }
    }
    let mut shown = 0;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        shown += 1;
        let name = sub.get_name();
        if sub
            .get_about()
            .is_none_or(|a| a.to_string().trim().is_empty())
        {
            problems.push(format!("`{name}` has no description"));
        }
        for arg in sub.get_arguments().filter(|a| !a.is_hide_set()) {
            if arg
                .get_help()
                .is_none_or(|h| h.to_string().trim().is_empty())
            {
                problems.push(format!("`{name}`: argument `{}` has no help", arg.get_id()));
            }
        }
    }
    assert!(shown >= 10, "only {shown} commands are shown");
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    let hidden: Vec<&str> = cmd
        .get_subcommands()
        .filter(|s| s.is_hide_set())
        .map(|s| s.get_name())
        .collect();
    assert_eq!(
        hidden, NOT_BUILT,
        "the hidden commands are the ones not built"
    );
}

#[test]
fn help_shows_each_built_command_with_a_description_and_no_other() {
    let sb = Sandbox::new();
    let out = run_ok(&sb, &["--help"]);
    let listed: Vec<(String, String)> = out
        .stdout
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .map(|l| {
            let l = l.trim();
            let (name, about) = l.split_once(' ').unwrap_or((l, ""));
            (name.to_owned(), about.trim().to_owned())
        })
        .collect();
    let names: Vec<&str> = listed.iter().map(|(n, _)| n.as_str()).collect();
    for (name, about) in &listed {
        assert!(
            !about.is_empty(),
            "`{name}` has no description:\n{}",
            out.stdout
        );
    }
    for hidden in NOT_BUILT {
        assert!(
            !names.contains(hidden),
            "--help lists `{hidden}`:\n{}",
            out.stdout
        );
    }
    for shown in shown_commands() {
        assert!(
            names.contains(&shown.as_str()),
            "--help misses `{shown}`:\n{}",
            out.stdout
        );
    }
    assert!(names.contains(&"help"), "{}", out.stdout);
    assert_eq!(names.len(), shown_commands().len() + 1, "{}", out.stdout);
}

#[test]
fn queue_commands_are_shown_with_their_arguments() {
    let shown = shown_commands();
    for name in QUEUE_COMMANDS {
        assert!(shown.iter().any(|s| s == name), "`{name}` is not shown");
    }
    let sb = Sandbox::new();
    let out = run_ok(&sb, &["submit", "--help"]);
    for needle in [
        "<QUEUE>",
        "[PAYLOAD]...",
        "--key <K>",
        "--wait",
        "line of stdin",
    ] {
        assert!(out.stdout.contains(needle), "{needle}:\n{}", out.stdout);
    }
    let out = run_ok(&sb, &["requeue", "--help"]);
    for needle in ["--all", "[ID]...", "queue QUEUE --dead"] {
        assert!(out.stdout.contains(needle), "{needle}:\n{}", out.stdout);
    }
    let out = run_ok(&sb, &["queue", "--help"]);
    for needle in [
        "--dead",
        "--json",
        "(default: 30s; `status` and `queue`: 5s)",
    ] {
        assert!(out.stdout.contains(needle), "{needle}:\n{}", out.stdout);
    }
}

#[test]
fn every_shown_subcommand_help_describes_its_arguments() {
    let sb = Sandbox::new();
    let out = run_ok(&sb, &["lock", "--help"]);
    for needle in ["<NAME>", "lock_dir/NAME.lock", "<CMD>...", "after `--`"] {
        assert!(out.stdout.contains(needle), "{needle}:\n{}", out.stdout);
    }
    let out = run_ok(&sb, &["scale", "--help"]);
    assert!(out.stdout.contains("<N>"), "{}", out.stdout);
    assert!(out.stdout.contains("How many workers"), "{}", out.stdout);
}

#[test]
fn man_page_is_one_complete_page_that_renders_without_warnings() {
    let sb = Sandbox::new();
    let out = run_ok(&sb, &["man"]);
    let roff = &out.stdout;
    assert!(
        roff.starts_with(".ie ") || roff.starts_with(".TH"),
        "{roff}"
    );
    assert!(roff.contains(".TH PLUMULE 1"), "{roff}");
    // The old stub pointed at plumule-run(1) and such, which do not exist.
    assert!(
        !roff.contains("plumule\\-run"),
        "links to missing pages:\n{roff}"
    );
    for section in plumule::manpage::SECTIONS {
        let heading = if section.contains(' ') {
            format!(".SH \"{section}\"\n")
        } else {
            format!(".SH {section}\n")
        };
        assert!(roff.contains(&heading), "no {heading}in:\n{roff}");
    }
    for shown in shown_commands() {
        assert!(
            roff.contains(&format!("\\fBplumule {shown}\\fR")),
            "COMMANDS misses `{shown}`"
        );
    }
    let commands = section(roff, "COMMANDS");
    for hidden in NOT_BUILT {
        assert!(!has_word(commands, hidden), "COMMANDS documents `{hidden}`");
        assert!(
            !roff.contains(&format!("plumule {hidden}")),
            "the page shows `plumule {hidden}`"
        );
    }
    assert!(!roff.contains("not supported yet"), "{roff}");
    assert!(!roff.contains("not built"), "{roff}");
    let configuration = section(roff, "CONFIGURATION");
    for needle in [
        "runtime_dir",
        "stop_timeout",
        "healthy_after",
        "PLUMULE_WORKER_ID",
        "PLUMULE_CONFIG",
        "notify.sock",
        "SIGUSR1",
        "75",
    ] {
        assert!(roff.contains(needle), "the page never mentions {needle}");
    }
    // The queue keys and both protocols, byte by byte for frames.
    for needle in [
        "[queue.NAME]",
        "max_pending",
        "max_attempts",
        "job_timeout",
        "4\\-byte big\\-endian length",
        "while read",
    ] {
        assert!(
            configuration.contains(needle),
            "CONFIGURATION never mentions {needle}"
        );
    }

    let Some(man) = needed_program("man", "man-db") else {
        return;
    };
    let page = sb.write_file("plumule.1", roff, 0o644);
    let script = format!(
        "exec {} --warnings=w -l - < {}",
        sh_str(&man),
        sh_str(&page)
    );
    let mut rendering = sb.spawn_master_via("/bin/sh", &["-c", &script], "man -l -", |c| {
        c.env("MANWIDTH", "80")
            .env_remove("MANPAGER")
            .env_remove("PAGER");
    });
    let status = rendering.wait_exit(DEADLINE);
    let (text, warnings) = (rendering.stdout_text(), rendering.stderr_text());
    assert_exit_code(status, 0, &warnings);
    assert!(warnings.is_empty(), "man warns:\n{warnings}");
    for section in plumule::manpage::SECTIONS {
        assert!(
            text.lines().any(|l| l.trim_end() == *section),
            "the rendered page has no {section} heading:\n{text}"
        );
    }
}

#[test]
fn completions_exit_0_and_leave_hidden_commands_out() {
    let sb = Sandbox::new();
    for shell in ["bash", "zsh", "fish"] {
        let out = run_ok(&sb, &["completions", shell]);
        for shown in shown_commands() {
            assert!(
                has_word(&out.stdout, &shown),
                "{shell} completions miss `{shown}`"
            );
        }
        for hidden in NOT_BUILT {
            assert!(
                !has_word(&out.stdout, hidden),
                "{shell} completions offer `{hidden}`"
            );
        }
    }
}

#[test]
fn word_matching_ignores_longer_words() {
    assert!(has_word("plumule__queue)", "queue"));
    assert!(has_word("'queue:Queue counters'", "queue"));
    assert!(!has_word("programs and queues", "queue"));
    assert!(!has_word("requeue", "queue"));
}
