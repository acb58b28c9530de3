//! Whole-file tests: malformed files and the located messages they get, the SPEC §2 example,
//! the SPEC §9 defaults, path resolution and default folders.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;

use super::*;

const FILE: &str = "/etc/plumule/plumule.toml";

/// An environment with only `vars`, as root.
fn host_parse(
    text: &str,
    vars: &[(&str, &str)],
    euid: u32,
    unsupported: &[Unsupported],
) -> Result<Config, ConfigError> {
    let var = |name: &str| {
        vars.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| OsString::from(v))
    };
    let host = Host {
        var: &var,
        euid,
        hostname: HOSTNAME,
        private_dir: &|_, _| Ok(()),
    };
    parse_with(text, Path::new(FILE), &host, unsupported)
}

/// The host name of the tests' host: the default `node`.
const HOSTNAME: &str = "testhost";

/// Parses with today's list of unsupported keys.
fn parse_now(text: &str) -> Result<Config, ConfigError> {
    host_parse(text, &[], 0, UNSUPPORTED)
}

/// Parses the whole schema, as if every feature were built.
fn parse_all(text: &str) -> Result<Config, ConfigError> {
    host_parse(text, &[], 0, &[])
}

fn ok(text: &str) -> Config {
    parse_all(text).unwrap_or_else(|e| panic!("expected a valid config, got:\n{e}"))
}

/// The error's lines, for a file that must be refused with today's list.
fn problems(text: &str) -> Vec<String> {
    match parse_now(text) {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(e) => e.to_string().lines().map(str::to_owned).collect(),
    }
}

/// The single problem of a file that must be refused.
fn problem(text: &str) -> String {
    let all = problems(text);
    assert_eq!(all.len(), 1, "expected one problem, got {all:#?}");
    all.into_iter().next().unwrap()
}

fn line(rest: &str) -> String {
    format!("{FILE}:{rest}")
}

const WEB: &str = "[program.web]\ncommand = [\"/usr/bin/web\"]\n";

// ---- Malformed files: each with its located message. ----

#[test]
fn unknown_key_suggests_the_close_one() {
    let text = format!("{WEB}worker = 4\n");
    assert_eq!(
        problem(&text),
        line("3:1: program.web.worker: unknown key `worker`, did you mean `workers`?")
    );
}

#[test]
fn unknown_key_without_a_close_one_lists_the_keys() {
    let text = "[plumule]\nfrobnicate = true\n";
    let p = problem(text);
    assert!(
        p.starts_with(&line(
            "2:1: plumule.frobnicate: unknown key `frobnicate`; expected one of `runtime_dir`"
        )),
        "{p}"
    );
}

#[test]
fn unknown_table_suggests_the_close_one() {
    let text = "[programs.web]\ncommand = \"x\"\n";
    assert_eq!(
        problem(text),
        line("1:2: programs: unknown key `programs`, did you mean `program`?")
    );
}

#[test]
fn unknown_key_in_an_inline_table() {
    let text = format!("{WEB}backoff = {{ initail = \"1s\" }}\n");
    assert_eq!(
        problem(&text),
        line("3:13: program.web.backoff.initail: unknown key `initail`, did you mean `initial`?")
    );
}

#[test]
fn wrong_type_names_the_key() {
    let text = format!("{WEB}workers = \"4\"\n");
    assert_eq!(
        problem(&text),
        line("3:11: program.web.workers: invalid type: string \"4\", expected an integer")
    );
}

#[test]
fn wrong_type_inside_an_array() {
    let text = "[program.web]\ncommand = [\"/bin/x\", 5]\n";
    assert_eq!(
        problem(text),
        line("2:22: program.web.command: invalid type: integer `5`, expected a string")
    );
}

#[test]
fn table_where_a_value_belongs() {
    let text = format!("{WEB}healthy_after.seconds = 5\n");
    assert_eq!(
        problem(&text),
        line("3:15: program.web.healthy_after: invalid type: table, expected a value")
    );
    let text = format!("{WEB}[program.web.command]\nx = 1\n");
    let p = problem(&text);
    // toml itself refuses a second definition of `command`.
    assert!(p.starts_with(&line("3:1: program.web.command: ")), "{p}");
}

#[test]
fn bare_number_duration_suggests_the_string() {
    let text = format!("{WEB}backoff = {{ initial = 5 }}\n");
    assert_eq!(
        problem(&text),
        line(
            "3:23: program.web.backoff.initial: expected a duration string like \"5s\", \
             found the number 5; write \"5s\""
        )
    );
}

#[test]
fn bad_duration_string() {
    let text = "[plumule]\nshutdown_timeout = \"30 fortnights\"\n";
    let p = problem(text);
    assert!(
        p.starts_with(&line(
            "2:20: plumule.shutdown_timeout: invalid duration \"30 fortnights\""
        )),
        "{p}"
    );
}

#[test]
fn bad_size() {
    let text = format!("{WEB}stdout = {{ file = \"out.log\", max_size = \"10 MB s\" }}\n");
    assert_eq!(
        problem(&text),
        line(
            "3:41: program.web.stdout.max_size: invalid size \"10 MB s\"; write it like \
             \"10MiB\" (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        )
    );
}

#[test]
fn unknown_signal_suggests_the_close_one() {
    let text = format!("{WEB}stop_signal = \"TREM\"\n");
    assert_eq!(
        problem(&text),
        line("3:15: program.web.stop_signal: unknown signal `TREM`, did you mean `TERM`?")
    );
}

#[test]
fn duplicate_program_is_refused_at_its_second_header() {
    let text = format!("{WEB}[program.db]\ncommand = \"db\"\n{WEB}");
    let p = problem(&text);
    assert!(
        p.starts_with(&line(
            "5:1: program.web: invalid table header; duplicate key `web`"
        )),
        "{p}"
    );
}

#[test]
fn bad_program_name() {
    let text = "[program.\"web.1\"]\ncommand = \"x\"\n";
    assert_eq!(
        problem(text),
        line(
            "1:10: program.\"web.1\": invalid program name `web.1`: use 1 to 64 characters \
             among A-Z a-z 0-9 _ -"
        )
    );
}

#[test]
fn bad_lock_names() {
    let text =
        format!("{WEB}locks = [\".hidden\", {{ name = \"db/{{worker}}\" }}, \"x-{{id}}\"]\n");
    assert_eq!(
        problems(&text),
        [
            line(
                "3:10: program.web.locks: invalid lock name `.hidden`: use 1 to 100 characters \
                 among A-Z a-z 0-9 . _ -, not starting with a dot"
            ),
            line(
                "3:30: program.web.locks: invalid lock name `db/0`: use 1 to 100 characters \
                 among A-Z a-z 0-9 . _ -, not starting with a dot (`db/{worker}` for worker 0)"
            ),
            line(
                "3:47: program.web.locks: invalid lock name `x-{id}`: `{worker}` is the only \
                 placeholder"
            ),
        ]
    );
}

#[test]
fn lock_name_too_long_for_the_largest_worker_id() {
    let name = format!("{}-{{worker}}", "a".repeat(98));
    let text = format!("{WEB}workers = 100\nlocks = [\"{name}\"]\n");
    let p = problem(&text);
    assert!(
        p.starts_with(&line("4:10: program.web.locks: invalid lock name")),
        "{p}"
    );
    assert!(p.ends_with("for worker 99)"), "{p}");
    // With 10 workers the longest name is 99 + 1 characters.
    ok(&format!("{WEB}workers = 10\nlocks = [\"{name}\"]\n"));
}

#[test]
fn duplicate_lock_is_refused() {
    let text = format!("{WEB}locks = [\"db\", {{ name = \"db\", shared = true }}]\n");
    assert_eq!(
        problem(&text),
        line("3:25: program.web.locks: lock `db` is listed twice")
    );
}

#[test]
fn after_naming_an_undefined_program() {
    let text = format!("{WEB}after = [\"wbe\", \"nothing\"]\n");
    assert_eq!(
        problems(&text),
        [
            line("3:10: program.web.after: no program named `wbe`, did you mean `web`?"),
            line("3:17: program.web.after: no program named `nothing`"),
        ]
    );
}

#[test]
fn after_cycle_names_the_cycle() {
    let text = "[program.a]\ncommand = \"a\"\nafter = [\"b\"]\n\
                [program.b]\ncommand = \"b\"\nafter = [\"c\"]\n\
                [program.c]\ncommand = \"c\"\nafter = [\"a\"]\n\
                [program.d]\ncommand = \"d\"\nafter = [\"d\"]\n";
    let err = parse_all(text).unwrap_err().to_string();
    assert_eq!(
        err.lines().collect::<Vec<_>>(),
        [
            line("9:10: program.c.after: `after` makes a cycle: a -> b -> c -> a"),
            line("12:10: program.d.after: `after` makes a cycle: d -> d"),
        ]
    );
}

#[test]
fn queue_naming_an_undefined_queue() {
    let text = "[program.resize]\ncommand = \"r\"\nqueue = \"thumbnail\"\n\
                [queue.thumbnails]\n";
    let err = parse_all(text).unwrap_err().to_string();
    assert_eq!(
        err,
        line("3:9: program.resize.queue: no queue named `thumbnail`, did you mean `thumbnails`?")
    );
    let err = parse_all("[program.r]\ncommand = \"r\"\nqueue = \"q\"\n").unwrap_err();
    assert_eq!(
        err.to_string(),
        line("3:9: program.r.queue: no queue named `q`: none is defined")
    );
}

#[test]
fn nonexistent_user_and_group() {
    let text = format!(
        "{WEB}user = \"plumule-no-such-user\"\ngroup = \"plumule-no-such-group\"\n\
         [plumule]\ncontrol_group = \"plumule-no-such-group\"\n"
    );
    assert_eq!(
        problems(&text),
        [
            line("3:8: program.web.user: no user `plumule-no-such-user` on this system"),
            line("4:9: program.web.group: no group `plumule-no-such-group` on this system"),
            line("6:17: plumule.control_group: no group `plumule-no-such-group` on this system"),
        ]
    );
}

#[test]
fn workers_limit_is_stated() {
    let text = format!("{WEB}workers = 20000\n");
    assert_eq!(
        problem(&text),
        line("3:11: program.web.workers: must be between 0 and 10000, found 20000")
    );
    assert_eq!(
        problem(&format!("{WEB}workers = -1\n")),
        line("3:11: program.web.workers: must be between 0 and 10000, found -1")
    );
}

#[test]
fn backoff_values_out_of_range() {
    let text = format!("{WEB}backoff = {{ initial = \"1m\", multiplier = 0.5, jitter = 1.5 }}\n");
    assert_eq!(
        problems(&text),
        [
            line("3:23: program.web.backoff.initial: `initial` (1m) is longer than `max` (30s)"),
            line(
                "3:42: program.web.backoff.multiplier: must be a number of at least 1.0 \
                 (1.0 keeps the delay constant), found 0.5"
            ),
            line(
                "3:56: program.web.backoff.jitter: must be between 0.0 and 1.0 \
                 (a fraction of the delay), found 1.5"
            ),
        ]
    );
}

#[test]
fn empty_commands() {
    assert_eq!(
        problem("[program.a]\ncommand = []\n"),
        line("2:11: program.a.command: the command is empty: name at least the program to run")
    );
    assert_eq!(
        problem("[program.a]\ncommand = [\"\", \"x\"]\n"),
        line("2:12: program.a.command: the program to run (the first element) is empty")
    );
    assert_eq!(
        problem("[program.a]\ncommand = \"  \"\n"),
        line("2:11: program.a.command: the command is empty")
    );
}

#[test]
fn missing_command_is_located_at_the_program() {
    let p = problem("[program.web]\nworkers = 2\n");
    assert!(
        p.starts_with(&line("1:10: program.web.command: missing key `command`")),
        "{p}"
    );
}

#[test]
fn bad_umask() {
    assert_eq!(
        problem(&format!("{WEB}umask = \"0999\"\n")),
        line(
            "3:9: program.web.umask: invalid value \"0999\": expected octal digits at most \
             \"0777\", like \"022\""
        )
    );
    assert_eq!(
        problem(&format!("{WEB}umask = 18\n")),
        line(
            "3:9: program.web.umask: expected an octal string like \"022\", found a number; \
             put it in quotes"
        )
    );
}

#[test]
fn unknown_restart_value_suggests_the_close_one() {
    assert_eq!(
        problem(&format!("{WEB}restart = \"onfailure\"\n")),
        line(
            "3:11: program.web.restart: unknown restart policy `onfailure`, did you mean \
             `on-failure`?"
        )
    );
    assert_eq!(
        problem(&format!("{WEB}restart = \"sometimes\"\n")),
        line(
            "3:11: program.web.restart: unknown restart policy `sometimes`; expected one of \
             `always`, `on-failure`, `never`"
        )
    );
}

#[test]
fn other_unknown_choices() {
    let text = format!(
        "[plumule]\nlog_level = \"warning\"\n{WEB}reload = \"reastart\"\nstdout = \"logs\"\n"
    );
    assert_eq!(
        problems(&text),
        [
            line("2:13: plumule.log_level: unknown log level `warning`, did you mean `warn`?"),
            line(
                "5:10: program.web.reload: unknown reload mode `reastart`, did you mean `restart`?"
            ),
            line("6:10: program.web.stdout: unknown output `logs`, did you mean `log`?"),
        ]
    );
}

#[test]
fn metrics_takes_a_tcp_or_unix_address_resolved_against_the_config_folder() {
    let unix = parse_now("[plumule]\nmetrics = \"unix:run/metrics.sock\"\n").unwrap();
    assert_eq!(
        unix.metrics,
        Some(ListenAddr::Unix("/etc/plumule/run/metrics.sock".into()))
    );
    let tcp = parse_now("[plumule]\nmetrics = \"tcp:[::1]:9187\"\n").unwrap();
    assert_eq!(
        tcp.metrics,
        Some(ListenAddr::Tcp("[::1]:9187".parse().unwrap()))
    );
    assert_eq!(
        problem("[plumule]\nmetrics = \"systemd:m\"\n"),
        line("2:11: plumule.metrics: expected a tcp:HOST:PORT or unix:PATH address")
    );
    assert!(problem("[plumule]\nmetrics = \"tcp:localhost:9187\"\n")
        .contains("expected tcp:HOST:PORT with an IP address"),);
}

/// A list of keys not built, as a future feature would add to [`UNSUPPORTED`].
const NOT_BUILT: &[Unsupported] = &[
    Unsupported {
        key: "queue.*",
        value: None,
    },
    Unsupported {
        key: "program.*.ready",
        value: Some("notify"),
    },
];

#[test]
fn unsupported_keys_are_refused_where_they_are_set() {
    let text = "[program.resize]\ncommand = \"r\"\nqueue = \"t\"\nready = \"notify\"\n\
                [queue.t]\n";
    let err = host_parse(text, &[], 0, NOT_BUILT).unwrap_err();
    let got: Vec<String> = err.to_string().lines().map(str::to_owned).collect();
    assert_eq!(
        got,
        [
            line("4:1: program.resize.ready: `ready = \"notify\"` is not supported yet"),
            line("5:8: queue.t: `queue` is not supported yet"),
        ]
    );
    // `ready = "started"` is fine, and so is everything with today's list.
    host_parse(
        "[program.a]\ncommand = \"a\"\nready = \"started\"\n",
        &[],
        0,
        NOT_BUILT,
    )
    .unwrap();
    parse_now(text).unwrap();
}

#[test]
fn several_problems_are_reported_at_once_in_file_order() {
    let text = "[program.web]\ncommand = []\nworkers = 20000\nrestart = \"alway\"\n\
                stop_signal = \"TREM\"\n\
                [program.\"bad name\"]\ncommand = \"x\"\nhealthy_after = 5\n";
    assert_eq!(
        problems(text),
        [
            line(
                "2:11: program.web.command: the command is empty: name at least the program to run"
            ),
            line("3:11: program.web.workers: must be between 0 and 10000, found 20000"),
            line(
                "4:11: program.web.restart: unknown restart policy `alway`, did you mean `always`?"
            ),
            line("5:15: program.web.stop_signal: unknown signal `TREM`, did you mean `TERM`?"),
            line(
                "6:10: program.\"bad name\": invalid program name `bad name`: use 1 to 64 \
                 characters among A-Z a-z 0-9 _ -"
            ),
            line(
                "8:17: program.\"bad name\".healthy_after: expected a duration string like \
                 \"5s\", found the number 5; write \"5s\""
            ),
        ]
    );
}

#[test]
fn syntax_error_is_located() {
    let p = problem("[program.web]\ncommand = \"unterminated\n");
    assert!(p.starts_with(&line("2:")), "{p}");
    assert!(!p.contains('\n'));
}

/// Found by the `config` fuzz target: toml refuses a control character in a comment with an
/// empty message, which left `FILE:1:2: ` and nothing to go on.
#[test]
fn control_character_in_a_comment_gets_a_message_not_an_empty_line() {
    assert_eq!(problem("#\0"), line("1:2: unexpected character '\\0'"));
    assert_eq!(
        problem("[plumule]\n# tab\t is fine, a bell\u{7} is not\n"),
        line("2:23: unexpected character '\\u{7}'")
    );
}

#[test]
fn env_names_and_reserved_variables() {
    let text = format!("{WEB}env = {{ \"A=B\" = \"1\", PLUMULE_WORKER_ID = \"3\", OK = \"1\" }}\n");
    assert_eq!(
        problems(&text),
        [
            line(
                "3:9: program.web.env.\"A=B\": invalid variable name \"A=B\": it must be \
                 non-empty, without `=` or NUL"
            ),
            line("3:22: program.web.env.PLUMULE_WORKER_ID: `PLUMULE_WORKER_ID` is set by plumule for every worker"),
        ]
    );
}

#[test]
fn exit_codes_and_start_limit_ranges() {
    let text = format!(
        "{WEB}success_exit_codes = [0, 300]\nstart_limit = {{ burst = 0, interval = \"0s\" }}\n"
    );
    assert_eq!(
        problems(&text),
        [
            line("3:26: program.web.success_exit_codes: exit codes are 0 to 255, found 300"),
            line("4:25: program.web.start_limit.burst: must be between 1 and 10000, found 0"),
            line("4:39: program.web.start_limit.interval: must be longer than 0"),
        ]
    );
}

#[test]
fn output_file_rules() {
    let text = format!(
        "{WEB}stdout = {{ file = \"a.log\", keep = 3 }}\nstderr = {{ max_size = \"1MiB\" }}\n"
    );
    assert_eq!(
        problems(&text),
        [
            line(
                "3:35: program.web.stdout.keep: `keep` needs `max_size`: without it the file \
                 is never rotated"
            ),
            line("4:10: program.web.stderr.file: missing key `file`: the file to write to"),
        ]
    );
    let text = "[program.r]\ncommand = \"r\"\nqueue = \"q\"\nstdout = \"null\"\n[queue.q]\n";
    assert_eq!(
        parse_all(text).unwrap_err().to_string(),
        line(
            "4:10: program.r.stdout: a program that consumes queue `q` answers jobs on its \
             stdout; remove `stdout`"
        )
    );
}

#[test]
fn queue_values_out_of_range() {
    let text = "[queue.q]\nprefetch = 0\nmax_attempts = 0\nprotocol = \"line\"\n\
                route = \"hash\"\nmax_frame = \"5GiB\"\nmax_pending = 0\n\
                retry_backoff = { max = \"10ms\" }\n";
    assert_eq!(
        parse_all(text).unwrap_err().to_string().lines().collect::<Vec<_>>(),
        [
            line("2:12: queue.q.prefetch: must be between 1 and 10000, found 0"),
            line("3:16: queue.q.max_attempts: must be at least 1, found 0"),
            line("4:12: queue.q.protocol: unknown protocol `line`, did you mean `lines`?"),
            line("5:9: queue.q.route: unknown route `hash`; expected one of `least-loaded`, `round-robin`, `key`"),
            line("6:13: queue.q.max_frame: must be at most 4294967295 bytes"),
            line("7:15: queue.q.max_pending: must be between 1 and 100000000, found 0"),
            line("8:25: queue.q.retry_backoff.max: `initial` (1s) is longer than `max` (10ms)"),
        ]
    );
}

#[test]
fn listen_rules() {
    let text = "[program.a]\ncommand = \"a\"\n\
                listen = [\"tcp:0.0.0.0:80\", { address = \"tcp:[::]:81\", mode = \"0660\" }]\n\
                [program.b]\ncommand = \"b\"\n\
                listen = [\"tcp:0.0.0.0:80\", \"udp:1.2.3.4:5\", { address = \"systemd:x\", name = \"a:b\" }]\n";
    let err = parse_all(text).unwrap_err().to_string();
    assert_eq!(
        err.lines().collect::<Vec<_>>(),
        [
            line("3:63: program.a.listen.mode: `mode` applies to unix: sockets only"),
            line("6:11: program.b.listen: program `a` listens on this address too"),
            line("6:29: program.b.listen: invalid address `udp:1.2.3.4:5`: expected tcp:HOST:PORT, unix:PATH or systemd:NAME"),
            line(
                "6:78: program.b.listen.name: invalid socket name `a:b`: use 1 to 255 \
                 printable ASCII characters, no `:` or space"
            ),
        ]
    );
}

#[test]
fn float_duration_suggests_milliseconds() {
    assert_eq!(
        problem(&format!("{WEB}stop_timeout = 1.5\n")),
        line(
            "3:16: program.web.stop_timeout: expected a duration string like \"5s\", found \
             the number 1.5; write \"1500ms\""
        )
    );
}

// ---- Valid files. ----

/// SPEC §2's example, without the keys not supported yet, with `root` as user and group.
const SPEC_EXAMPLE: &str = r#"
[plumule]
runtime_dir = "/run/plumule"      # pidfile, control socket, notify socket, lock files
state_dir = "/var/lib/plumule"    # durable queue data
lock_dir = "/run/plumule/locks"   # named lock files (default: runtime_dir/locks); share it to exclude across masters
control_group = "root"            # optional: members may use the control socket (0660)
shutdown_timeout = "30s"          # whole graceful stop, after which everything left is killed
log_level = "info"
node = "web-1"                    # optional: this master's name in a cluster (default: the host name)

[program.web]
command = ["/usr/bin/myapp", "--port", "8080"]   # argv, no shell; a plain string runs via /bin/sh -c
workers = 4
restart = "always"                # always | on-failure | never
success_exit_codes = [0]
healthy_after = "1s"              # a run this long resets the backoff
backoff = { initial = "100ms", max = "30s", multiplier = 2.0, jitter = 0.1 }
start_limit = { burst = 10, interval = "60s" }   # optional: past it the worker is `failed`
stop_signal = "TERM"
stop_timeout = "10s"              # then SIGKILL to the worker's whole process group
reload = "restart"                # restart | signal | none   (what a reload does to this program: §9)
reload_signal = "HUP"
env = { RUST_LOG = "info" }
inherit_env = true
cwd = "/srv/app"
user = "root"                     # drop privileges before exec (supplementary groups too)
group = "root"                    # default: the user's primary group
umask = "022"
stdout = "log"                    # log | inherit | null | { file = "...", max_size = "10MiB", keep = 5 }
stderr = "log"
locks = ["db-migrations"]         # file locks the worker holds for its whole life
ready = "started"                 # started | notify
ready_timeout = "30s"

[program.resize]
command = ["/usr/bin/resize-worker"]
workers = 2
"#;

fn root_user() -> UserSpec {
    let u = nix::unistd::User::from_name("root").unwrap().unwrap();
    UserSpec {
        name: "root".into(),
        uid: 0,
        gid: 0,
        home: u.dir,
        shell: u.shell,
    }
}

fn root_group() -> GroupSpec {
    GroupSpec {
        name: "root".into(),
        gid: 0,
    }
}

/// A program with SPEC §9's defaults.
fn default_program(name: &str, command: CommandSpec) -> Program {
    Program {
        command,
        ..crate::test_support::program(name, 1)
    }
}

#[test]
fn spec_example_parses_to_the_expected_values() {
    let config = parse_now(SPEC_EXAMPLE).unwrap_or_else(|e| panic!("{e}"));
    let web = Program {
        workers: 4,
        start_limit: Some(StartLimit {
            burst: 10,
            interval: Duration::from_secs(60),
        }),
        env: BTreeMap::from([("RUST_LOG".to_owned(), "info".to_owned())]),
        cwd: Some("/srv/app".into()),
        user: Some(root_user()),
        group: Some(root_group()),
        umask: Some(0o022),
        locks: vec![LockSpec {
            name: "db-migrations".into(),
            shared: false,
            cluster: false,
        }],
        ..default_program(
            "web",
            CommandSpec::Argv(vec![
                "/usr/bin/myapp".into(),
                "--port".into(),
                "8080".into(),
            ]),
        )
    };
    let resize = Program {
        workers: 2,
        ..default_program(
            "resize",
            CommandSpec::Argv(vec!["/usr/bin/resize-worker".into()]),
        )
    };
    let expected = Config {
        path: FILE.into(),
        runtime_dir: "/run/plumule".into(),
        state_dir: "/var/lib/plumule".into(),
        lock_dir: "/run/plumule/locks".into(),
        control_group: Some(root_group()),
        metrics: None,
        shutdown_timeout: Duration::from_secs(30),
        log_level: log::LevelFilter::Info,
        node: "web-1".into(),
        cluster: None,
        // Sorted by name.
        programs: vec![resize, web],
        queues: vec![],
    };
    assert_eq!(config, expected);
}

#[test]
fn full_schema_with_every_feature_parses() {
    // The keys not supported yet, as they will be once they are.
    let text = r#"
[plumule]
metrics = "tcp:127.0.0.1:9187"

[program.web]
command = ["/usr/bin/myapp"]
ready = "notify"
watchdog = "30s"
listen = ["tcp:0.0.0.0:8080", { address = "unix:web.sock", name = "admin", mode = "0660" }]
after = ["db"]

[program.db]
command = "exec db"

[program.resize]
command = ["/usr/bin/resize-worker"]
queue = "thumbnails"

[queue.thumbnails]
durable = true
protocol = "lines"
prefetch = 1
max_attempts = 3
retry_backoff = { initial = "1s", max = "1m", multiplier = 2.0 }
route = "least-loaded"
max_pending = 1000000
"#;
    let config = ok(text);
    assert_eq!(
        config.metrics,
        Some(ListenAddr::Tcp("127.0.0.1:9187".parse().unwrap()))
    );
    let web = config.program("web").unwrap();
    assert_eq!(web.ready, ReadyMode::Notify);
    assert_eq!(web.watchdog, Some(Duration::from_secs(30)));
    assert_eq!(web.after, ["db"]);
    assert_eq!(
        web.listen,
        [
            ListenSpec {
                address: ListenAddr::Tcp("0.0.0.0:8080".parse().unwrap()),
                name: "web".into(),
                mode: None,
            },
            ListenSpec {
                address: ListenAddr::Unix("/etc/plumule/web.sock".into()),
                name: "admin".into(),
                mode: Some(0o660),
            },
        ]
    );
    assert_eq!(
        config.program("db").unwrap().command,
        CommandSpec::Shell("exec db".into())
    );
    assert_eq!(
        config.program("resize").unwrap().queue.as_deref(),
        Some("thumbnails")
    );
    assert_eq!(config.queues.len(), 1);
    // Every feature is built today.
    assert_eq!(parse_now(text).unwrap(), config);
}

#[test]
fn defaults_are_spec_section_9() {
    let config = ok("[program.a]\ncommand = [\"a\"]\n[queue.q]\n");
    assert_eq!(
        config,
        Config {
            path: FILE.into(),
            runtime_dir: "/run/plumule".into(),
            state_dir: "/var/lib/plumule".into(),
            lock_dir: "/run/plumule/locks".into(),
            control_group: None,
            metrics: None,
            shutdown_timeout: Duration::from_secs(30),
            log_level: log::LevelFilter::Info,
            node: HOSTNAME.into(),
            cluster: None,
            programs: vec![default_program("a", CommandSpec::Argv(vec!["a".into()]))],
            queues: vec![Queue {
                name: "q".into(),
                durable: true,
                protocol: QueueProtocol::Lines,
                prefetch: 1,
                max_attempts: 3,
                retry_backoff: Backoff {
                    initial: Duration::from_secs(1),
                    max: Duration::from_secs(60),
                    multiplier: 2.0,
                    jitter: 0.1,
                },
                route: Route::LeastLoaded,
                max_pending: 1_000_000,
                max_frame: 16 << 20,
                job_timeout: None,
                backend: None,
                claim_after: Duration::from_secs(30),
                partitions: 64,
            }],
        }
    );
}

#[test]
fn empty_file_is_valid() {
    let config = ok("");
    assert!(config.programs.is_empty() && config.queues.is_empty());
}

#[test]
fn partial_tables_keep_the_other_defaults() {
    let config = ok(&format!(
        "{WEB}backoff = {{ max = \"1m\" }}\nstart_limit = {{}}\n\
         [queue.q]\nretry_backoff = {{ jitter = 0.5 }}\n"
    ));
    let web = config.program("web").unwrap();
    assert_eq!(
        web.backoff,
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(60),
            multiplier: 2.0,
            jitter: 0.1,
        }
    );
    assert_eq!(
        web.start_limit,
        Some(StartLimit {
            burst: 5,
            interval: Duration::from_secs(10),
        })
    );
    assert_eq!(config.queues[0].retry_backoff.jitter, 0.5);
    assert_eq!(config.queues[0].retry_backoff.max, Duration::from_secs(60));
}

#[test]
fn user_alone_brings_its_primary_group() {
    let config = ok(&format!("{WEB}user = \"root\"\n"));
    let web = config.program("web").unwrap();
    assert_eq!(web.user, Some(root_user()));
    assert_eq!(web.group, Some(root_group()));
    let config = ok(&format!("{WEB}user = \"0\"\n"));
    assert_eq!(config.program("web").unwrap().user, Some(root_user()));
}

#[test]
fn relative_paths_resolve_against_the_config_folder() {
    let text = r#"
[plumule]
runtime_dir = "run"
state_dir = "./state"
control_group = "root"

[program.a]
command = ["./bin/a", "./not-resolved"]
cwd = "srv/app"
stdout = { file = "logs/a.log", max_size = "10MiB", keep = 3 }
stderr = { file = "/var/log/a.err" }

[program.b]
command = ["bin/b"]
stdout = "null"
stderr = "inherit"

[program.c]
command = ["c"]
"#;
    let config = ok(text);
    assert_eq!(config.runtime_dir, Path::new("/etc/plumule/run"));
    assert_eq!(config.state_dir, Path::new("/etc/plumule/state"));
    assert_eq!(config.lock_dir, Path::new("/etc/plumule/run/locks"));
    let a = config.program("a").unwrap();
    assert_eq!(
        a.command,
        CommandSpec::Argv(vec!["/etc/plumule/bin/a".into(), "./not-resolved".into()])
    );
    assert_eq!(a.cwd.as_deref(), Some(Path::new("/etc/plumule/srv/app")));
    assert_eq!(
        a.stdout,
        OutputSpec::File {
            path: "/etc/plumule/logs/a.log".into(),
            max_size: Some(10 << 20),
            keep: 3,
        }
    );
    assert_eq!(
        a.stderr,
        OutputSpec::File {
            path: "/var/log/a.err".into(),
            max_size: None,
            keep: 5,
        }
    );
    let b = config.program("b").unwrap();
    assert_eq!(
        b.command,
        CommandSpec::Argv(vec!["/etc/plumule/bin/b".into()])
    );
    assert_eq!(
        (&b.stdout, &b.stderr),
        (&OutputSpec::Null, &OutputSpec::Inherit)
    );
    assert_eq!(
        config.program("c").unwrap().command,
        CommandSpec::Argv(vec!["c".into()])
    );
}

#[test]
fn relative_config_path_is_made_absolute() {
    let var = |_: &str| None;
    let host = Host {
        var: &var,
        euid: 0,
        hostname: HOSTNAME,
        private_dir: &|_, _| Ok(()),
    };
    let config = parse_with(
        "[plumule]\nstate_dir = \"s\"\n",
        Path::new("conf/plumule.toml"),
        &host,
        UNSUPPORTED,
    )
    .unwrap();
    let cwd = std::env::current_dir().unwrap();
    assert_eq!(config.path, cwd.join("conf/plumule.toml"));
    assert_eq!(config.state_dir, cwd.join("conf/s"));
}

#[test]
fn shared_and_worker_locks() {
    let config = ok(&format!(
        "{WEB}workers = 3\nlocks = [\"slot-{{worker}}\", {{ name = \"db\", shared = true }}]\n"
    ));
    assert_eq!(
        config.program("web").unwrap().locks,
        [
            LockSpec {
                name: "slot-{worker}".into(),
                shared: false,
                cluster: false,
            },
            LockSpec {
                name: "db".into(),
                shared: true,
                cluster: false,
            },
        ]
    );
}

#[test]
fn zero_workers_and_signals_in_every_spelling() {
    let config = ok(&format!(
        "{WEB}workers = 0\nstop_signal = \"sigint\"\nreload_signal = \"SIGUSR2\"\n"
    ));
    let web = config.program("web").unwrap();
    assert_eq!(web.workers, 0);
    assert_eq!(web.stop_signal, Signal::SIGINT);
    assert_eq!(web.reload_signal, Signal::SIGUSR2);
}

fn dirs(vars: &[(&str, &str)], euid: u32) -> (PathBuf, PathBuf, PathBuf) {
    let c = host_parse("", vars, euid, UNSUPPORTED).unwrap();
    (c.runtime_dir, c.state_dir, c.lock_dir)
}

#[test]
fn default_dirs_for_root_users_and_systemd() {
    let p = PathBuf::from;
    assert_eq!(
        dirs(&[("XDG_RUNTIME_DIR", "/run/user/0")], 0),
        (
            p("/run/plumule"),
            p("/var/lib/plumule"),
            p("/run/plumule/locks")
        )
    );
    assert_eq!(
        dirs(
            &[
                ("XDG_RUNTIME_DIR", "/run/user/1000"),
                ("XDG_STATE_HOME", "/home/u/.state"),
                ("HOME", "/home/u"),
            ],
            1000
        ),
        (
            p("/run/user/1000/plumule"),
            p("/home/u/.state/plumule"),
            p("/run/user/1000/plumule/locks")
        )
    );
    assert_eq!(
        dirs(&[("HOME", "/home/u"), ("XDG_STATE_HOME", "relative")], 1000),
        (
            p("/tmp/plumule-1000/run"),
            p("/home/u/.local/state/plumule"),
            p("/tmp/plumule-1000/run/locks")
        )
    );
    assert_eq!(
        dirs(&[("XDG_RUNTIME_DIR", "")], 1000),
        (
            p("/tmp/plumule-1000/run"),
            p("/tmp/plumule-1000/state"),
            p("/tmp/plumule-1000/run/locks")
        )
    );
    // systemd wins, for root and others; the first of several folders.
    for euid in [0, 1000] {
        assert_eq!(
            dirs(
                &[
                    ("RUNTIME_DIRECTORY", "/run/plumule:/run/other"),
                    ("STATE_DIRECTORY", "/var/lib/plumule-state"),
                    ("XDG_RUNTIME_DIR", "/run/user/1000"),
                ],
                euid
            ),
            (
                p("/run/plumule"),
                p("/var/lib/plumule-state"),
                p("/run/plumule/locks")
            )
        );
    }
    // The file wins over everything.
    let c = host_parse(
        "[plumule]\nruntime_dir = \"/r\"\n",
        &[("RUNTIME_DIRECTORY", "/run/plumule")],
        0,
        UNSUPPORTED,
    )
    .unwrap();
    assert_eq!((c.runtime_dir, c.lock_dir), (p("/r"), p("/r/locks")));
}

#[test]
fn config_path_search_order() {
    let p = |s: &str| PathBuf::from(s);
    assert_eq!(
        choose_config_path(Some(Path::new("a.toml")), Some("b.toml".into()), true),
        p("a.toml")
    );
    assert_eq!(
        choose_config_path(None, Some("b.toml".into()), true),
        p("b.toml")
    );
    assert_eq!(
        choose_config_path(None, Some("".into()), true),
        p("plumule.toml")
    );
    assert_eq!(
        choose_config_path(None, None, false),
        p("/etc/plumule/plumule.toml")
    );
}

#[test]
fn unsupported_list_matches_keys_and_values() {
    assert!(unsupported(&["program", "web", "listen"], None).is_none());
    assert!(unsupported(&["plumule", "metrics"], None).is_none());
    assert!(unsupported(&["program", "web", "after"], None).is_none());
    assert!(unsupported(&["program", "web", "ready"], Some("notify")).is_none());
    assert!(find_unsupported(NOT_BUILT, &["queue", "q"], None).is_some());
    assert!(find_unsupported(NOT_BUILT, &["queue", "q", "durable"], None).is_none());
    assert!(find_unsupported(NOT_BUILT, &["program", "w", "ready"], Some("notify")).is_some());
    assert!(find_unsupported(NOT_BUILT, &["program", "w", "ready"], Some("started")).is_none());
    assert!(unsupported(&["queue", "q"], None).is_none());
    assert!(unsupported(&["program", "web", "locks"], None).is_none());
}

// ---- load: the file system and its permissions. ----

fn write_config(dir: &Path, mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("plumule.toml");
    std::fs::write(&path, WEB).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

#[test]
fn load_reads_a_private_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), 0o644);
    let config = load(&path).unwrap();
    assert_eq!(config.path, path);
    assert_eq!(config.programs.len(), 1);
}

#[test]
fn load_refuses_files_others_can_write() {
    let dir = tempfile::tempdir().unwrap();
    for (mode, who) in [
        (0o664, "its group"),
        (0o646, "others"),
        (0o666, "its group and by others"),
    ] {
        let path = write_config(dir.path(), mode);
        let err = load(&path).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "{}: refusing a configuration file writable by {who} (mode {mode:04o}): \
                 whoever can write it chooses what plumule runs; run `chmod go-w` on it",
                path.display()
            )
        );
    }
}

#[test]
fn load_refuses_a_file_owned_by_someone_else() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), 0o644);
    let metadata = std::fs::metadata(&path).unwrap();
    let owner = metadata.uid();
    assert!(check_ownership(&metadata, owner).is_ok());
    if owner == 0 {
        // Root's files are always accepted.
        assert!(check_ownership(&metadata, 4242).is_ok());
        // A file of another user, as root: refused.
        nix::unistd::chown(&path, Some(nix::unistd::Uid::from_raw(4242)), None).unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(
            err.ends_with(
                "refusing a configuration file owned by uid 4242, neither root nor the \
                 current user (uid 0): its owner chooses what plumule runs; `chown` it"
            ),
            "{err}"
        );
    } else {
        let err = check_ownership(&metadata, owner + 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("owned by uid {owner}")), "{err}");
    }
}

#[test]
fn load_names_a_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.toml");
    let err = load(&path).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!(
            "{}: cannot read the configuration file: No such file or directory",
            path.display()
        )),
        "{err}"
    );
    let err = load(dir.path()).unwrap_err().to_string();
    assert!(err.ends_with("not a regular file"), "{err}");
}

#[test]
fn load_reports_located_problems_with_the_path() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plumule.toml");
    std::fs::write(&path, format!("{WEB}worker = 1\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let err = load(&path).unwrap_err();
    assert_eq!(
        err.problems,
        [Problem {
            file: None,
            location: Some(Location { line: 3, column: 1 }),
            key: Some("program.web.worker".into()),
            message: "unknown key `worker`, did you mean `workers`?".into(),
        }]
    );
    assert!(err
        .to_string()
        .starts_with(&format!("{}:3:1: ", path.display())));
}

#[test]
fn arrays_are_not_tables() {
    // A derived struct would take an array as its fields in order.
    assert_eq!(
        problem("plumule = [\"/run/x\"]\n"),
        line("1:11: plumule: invalid type: array, expected a table")
    );
    assert_eq!(
        problem("[[program.web]]\ncommand = \"x\"\n"),
        line("1:1: program.web: invalid type: array, expected a table")
    );
}

#[test]
fn duplicate_key_is_named() {
    assert_eq!(
        problem("[plumule]\nlog_level = \"info\"\nlog_level = \"info\"\n"),
        line("3:1: plumule.log_level: duplicate key `log_level` in table `plumule`")
    );
}

// ---- Every problem at once (the operator-experience issue). ----

/// Regression: a file with four mistakes showed only the unknown key; the other three came
/// one by one as each was fixed.
#[test]
fn four_mistakes_are_reported_together() {
    let text = "[program.web]\ncomand = [\"/usr/bin/web\"]\nstop_signal = \"TREM\"\n\
                stop_timeout = 10\nrestart = \"sometimes\"\n";
    assert_eq!(
        problems(text),
        [
            line("2:1: program.web.comand: unknown key `comand`, did you mean `command`?"),
            line("3:15: program.web.stop_signal: unknown signal `TREM`, did you mean `TERM`?"),
            line(
                "4:16: program.web.stop_timeout: expected a duration string like \"5s\", \
                 found the number 10; write \"10s\""
            ),
            line(
                "5:11: program.web.restart: unknown restart policy `sometimes`; expected one \
                 of `always`, `on-failure`, `never`"
            ),
        ]
    );
}

#[test]
fn every_unknown_key_is_reported_not_only_the_first() {
    let text = "[plumule]\nlog_levle = \"info\"\n[program.web]\ncommand = \"x\"\nworker = 2\n\
                backoff = { intial = \"1s\", maxx = \"2s\" }\n[queue.q]\nprefech = 2\n";
    assert_eq!(
        parse_all(text)
            .unwrap_err()
            .to_string()
            .lines()
            .collect::<Vec<_>>(),
        [
            line("2:1: plumule.log_levle: unknown key `log_levle`, did you mean `log_level`?"),
            line("5:1: program.web.worker: unknown key `worker`, did you mean `workers`?"),
            line("6:13: program.web.backoff.intial: unknown key `intial`, did you mean `initial`?"),
            line("6:28: program.web.backoff.maxx: unknown key `maxx`, did you mean `max`?"),
            line("8:1: queue.q.prefech: unknown key `prefech`, did you mean `prefetch`?"),
        ]
    );
}

#[test]
fn wrong_types_everywhere_are_reported_together_without_follow_up_noise() {
    // `command = 5` is a wrong type, not also a missing command; `locks` with a bad item is
    // reported once, at the item.
    let text = "[program.web]\ncommand = 5\nworkers = \"2\"\ninherit_env = \"yes\"\n\
                locks = [\"a\", 3]\nenv = { A = 1 }\n";
    assert_eq!(
        problems(text),
        [
            line(
                "2:11: program.web.command: invalid type: integer `5`, expected an array of \
                 strings (argv) or a string (run by /bin/sh -c)"
            ),
            line("3:11: program.web.workers: invalid type: string \"2\", expected an integer"),
            line("4:15: program.web.inherit_env: invalid type: string \"yes\", expected a boolean"),
            line(
                "5:15: program.web.locks: invalid type: integer `3`, expected a lock name or a \
                 table { name = \"...\", shared = true }"
            ),
            line("6:13: program.web.env.A: invalid type: integer `1`, expected a string"),
        ]
    );
}

#[test]
fn an_unknown_key_and_validation_problems_come_together() {
    let text = format!("{WEB}workerz = 2\nworkers = 20000\nhealthy_after = 5\n");
    assert_eq!(
        problems(&text),
        [
            line("3:1: program.web.workerz: unknown key `workerz`, did you mean `workers`?"),
            line("4:11: program.web.workers: must be between 0 and 10000, found 20000"),
            line(
                "5:17: program.web.healthy_after: expected a duration string like \"5s\", \
                 found the number 5; write \"5s\""
            ),
        ]
    );
}

/// Regression: `umask = 022` gave toml's bare "expected newline, `#`" with no key.
#[test]
fn umask_as_a_number_with_a_leading_zero_says_to_quote_it() {
    assert_eq!(
        problem(&format!("{WEB}umask = 022\n")),
        line(
            "3:9: program.web.umask: a number cannot start with 0 in TOML; write the umask \
             as a string: umask = \"022\""
        )
    );
}

#[test]
fn leading_zeros_are_hinted_and_the_rest_of_the_file_is_still_checked() {
    let text = format!(
        "{WEB}workers = 08\numask = 0027 # comment\nrestart = \"alway\"\n\
         backoff = {{ multiplier = 02.5 }}\nsuccess_exit_codes = [0, 01]\n\
         listen = [{{ address = \"unix:s\", mode = 0660 }}]\n"
    );
    assert_eq!(
        parse_all(&text).unwrap_err().to_string().lines().collect::<Vec<_>>(),
        [
            line("3:11: program.web.workers: a number cannot start with 0 in TOML: write workers = 8"),
            line(
                "4:9: program.web.umask: a number cannot start with 0 in TOML; write the umask \
                 as a string: umask = \"0027\""
            ),
            line(
                "5:11: program.web.restart: unknown restart policy `alway`, did you mean \
                 `always`?"
            ),
            line(
                "6:26: program.web.backoff.multiplier: a number cannot start with 0 in TOML: \
                 write multiplier = 2.5"
            ),
            line(
                "7:26: program.web.success_exit_codes: a number cannot start with 0 in TOML: \
                 write success_exit_codes = 1"
            ),
            line(
                "8:40: program.web.listen.mode: a number cannot start with 0 in TOML; write the \
                 mode as a string: mode = \"0660\""
            ),
        ]
    );
}

#[test]
fn a_real_syntax_error_after_a_leading_zero_is_still_reported() {
    let text = format!("{WEB}umask = 022\nworkers = \n");
    let all = problems(&text);
    assert_eq!(all.len(), 2, "{all:#?}");
    assert!(
        all[0].starts_with(&line("3:9: program.web.umask: ")),
        "{all:#?}"
    );
    assert!(all[1].starts_with(&line("4:")), "{all:#?}");
}

// ---- Warnings of `plumule check`. ----

/// The warnings about `text` (which must be valid) on a host where only `/bin/found` is an
/// executable and the master runs as `euid`.
fn warnings_as(text: &str, euid: u32) -> Vec<String> {
    let config = parse_all(text).unwrap_or_else(|e| panic!("expected a valid config:\n{e}"));
    let resolve = |name: &str, path: &std::ffi::OsStr, _: Option<&Path>| {
        if name == "/bin/found" || (name == "found" && path.to_str() == Some("/bin")) {
            Ok(())
        } else {
            Err(format!(
                "command not found: {name} (searched PATH={path:?})"
            ))
        }
    };
    let probe = Probe {
        euid,
        egid: euid,
        inherited_path: Some("/inherited".into()),
        default_path: std::ffi::OsStr::new("/bin"),
        resolve: &resolve,
    };
    let files = [(PathBuf::from(FILE), text.to_owned())];
    let shown = warnings::warnings(&config, &files, &probe).to_string();
    shown.lines().map(str::to_owned).collect()
}

#[test]
fn check_warns_about_what_cannot_run_here() {
    let text = "[program.a]\ncommand = [\"/bin/found\"]\ncwd = \"/nonexistent-plumule-dir\"\n\
                [program.b]\ncommand = [\"found\"]\ninherit_env = false\n\
                [program.c]\ncommand = [\"found\"]\n\
                [program.d]\ncommand = [\"lost\"]\nenv = { PATH = \"/bin\" }\n\
                user = \"root\"\ngroup = \"root\"\n";
    assert_eq!(
        warnings_as(text, 0),
        [
            format!(
                "warning: {}",
                line("3:1: program.a.cwd: the folder /nonexistent-plumule-dir does not exist")
            ),
            // Inherits the master's PATH, where `found` is not.
            format!(
                "warning: {}",
                line(
                    "8:1: program.c.command: command not found: found (searched \
                     PATH=\"/inherited\")"
                )
            ),
            format!(
                "warning: {}",
                line("10:1: program.d.command: command not found: lost (searched PATH=\"/bin\")")
            ),
        ]
    );
    // Not root: `user` and `group` cannot be switched to.
    let not_root = warnings_as(text, 4242);
    assert_eq!(not_root.len(), 5, "{not_root:#?}");
    assert_eq!(
        not_root[3],
        format!(
            "warning: {}",
            line(
                "12:1: program.d.user: plumule is not running as root (uid 4242): it cannot \
                 start workers as user `root`"
            )
        )
    );
    assert!(
        not_root[4].starts_with(&format!("warning: {}", line("13:1: program.d.group: "))),
        "{not_root:#?}"
    );
}

#[test]
fn a_file_that_runs_here_has_no_warnings() {
    let text = "[program.a]\ncommand = [\"/bin/found\"]\ncwd = \"/\"\n\
                [program.b]\ncommand = \"anything at all\"\n";
    // A shell command runs /bin/sh, which this fake host does not have.
    assert_eq!(warnings_as(text, 0).len(), 1);
    assert!(warnings_as("[program.a]\ncommand = [\"/bin/found\"]\ncwd = \"/\"\n", 0).is_empty());
}

// ---- nice, oom_score_adj, limits. ----

#[test]
fn nice_oom_score_adj_and_limits_are_read() {
    let text = format!(
        "{WEB}nice = -5\noom_score_adj = -1000\n\
         limits = {{ nproc = 64, nofile = 65536, core = \"unlimited\", memlock = \"64MiB\", as = 0 }}\n"
    );
    let config = ok(&text);
    let web = config.program("web").unwrap();
    assert_eq!((web.nice, web.oom_score_adj), (Some(-5), Some(-1000)));
    let limit = |resource, value| Limit { resource, value };
    assert_eq!(
        web.limits,
        [
            limit(LimitResource::As, Some(0)),
            limit(LimitResource::Core, None),
            limit(LimitResource::Memlock, Some(64 << 20)),
            limit(LimitResource::Nofile, Some(65536)),
            limit(LimitResource::Nproc, Some(64)),
        ],
        "sorted by resource"
    );
    let plain = ok(WEB);
    let web = plain.program("web").unwrap();
    assert_eq!(
        (web.nice, web.oom_score_adj),
        (None, None),
        "unset: inherited"
    );
    assert!(web.limits.is_empty());
}

#[test]
fn nice_and_oom_score_adj_ranges() {
    assert_eq!(
        problem(&format!("{WEB}nice = 20\n")),
        line("3:8: program.web.nice: must be between -20 and 19, found 20")
    );
    assert_eq!(
        problem(&format!("{WEB}nice = -21\n")),
        line("3:8: program.web.nice: must be between -20 and 19, found -21")
    );
    assert_eq!(
        problem(&format!("{WEB}oom_score_adj = 1001\n")),
        line("3:17: program.web.oom_score_adj: must be between -1000 and 1000, found 1001")
    );
    assert_eq!(
        problem(&format!("{WEB}nice = \"high\"\n")),
        line("3:8: program.web.nice: invalid type: string \"high\", expected an integer")
    );
    ok(&format!("{WEB}nice = 19\noom_score_adj = 1000\n"));
    ok(&format!("{WEB}nice = -20\noom_score_adj = -1000\n"));
}

#[test]
fn limit_names_and_values_are_checked() {
    assert_eq!(
        problem(&format!("{WEB}limits = {{ nofiles = 10 }}\n")),
        line("3:12: program.web.limits.nofiles: unknown limit `nofiles`, did you mean `nofile`?")
    );
    let p = problem(&format!("{WEB}limits = {{ cpu = 10 }}\n"));
    assert!(
        p.contains(
            "unknown limit `cpu`; expected one of `as`, `core`, `memlock`, `nofile`, `nproc`"
        ),
        "{p}"
    );
    assert_eq!(
        problem(&format!("{WEB}limits = {{ nofile = \"unlimited\" }}\n")),
        line(
            "3:21: program.web.limits.nofile: the kernel caps open files (fs.nr_open): \
             give a number like 65536"
        )
    );
    assert_eq!(
        problem(&format!("{WEB}limits = {{ nproc = -1 }}\n")),
        line("3:20: program.web.limits.nproc: must be at least 0, found -1")
    );
    let p = problem(&format!("{WEB}limits = {{ nproc = \"10MiB\" }}\n"));
    assert!(
        p.contains("expected a whole number or \"unlimited\""),
        "{p}"
    );
    let p = problem(&format!("{WEB}limits = {{ core = \"lots\" }}\n"));
    assert!(
        p.contains("program.web.limits.core: invalid size \"lots\""),
        "{p}"
    );
    assert_eq!(
        problem(&format!("{WEB}limits = 5\n")),
        line("3:10: program.web.limits: invalid type: integer `5`, expected a table like { nofile = 65536 }")
    );
}

// ---- include. ----

/// A folder with `plumule.toml` (`main`) and the `(name, text)` files, all mode 0600.
fn include_tree(main: &str, files: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files.iter().chain([&("plumule.toml", main)]) {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let main = dir.path().join("plumule.toml");
    (dir, main)
}

/// Parses the file at `path` (and what it includes) as if every feature were built.
fn load_all(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).unwrap();
    let var = |_: &str| None;
    let host = Host {
        var: &var,
        euid: 0,
        hostname: HOSTNAME,
        private_dir: &|_, _| Ok(()),
    };
    parse_with(&text, path, &host, &[])
}

fn load_lines(path: &Path) -> Vec<String> {
    match load_all(path) {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e.to_string().lines().map(str::to_owned).collect(),
    }
}

#[test]
fn included_files_bring_programs_and_queues_in_name_order() {
    let (dir, main) = include_tree(
        &format!("include = [\"conf.d/*.toml\", \"extra.toml\"]\n{WEB}"),
        &[
            (
                "conf.d/b.toml",
                "[program.b]\ncommand = [\"./run\"]\ncwd = \"data\"\n",
            ),
            (
                "conf.d/a.toml",
                "[program.a]\ncommand = [\"a\"]\n[queue.q]\n",
            ),
            ("conf.d/notes.txt", "not toml"),
            ("extra.toml", "[program.c]\ncommand = [\"c\"]\n"),
        ],
    );
    let config = load_all(&main).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> = config.programs.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c", "web"]);
    assert_eq!(config.queues.len(), 1);
    assert_eq!(config.path, main);
    // Relative paths of an included file resolve against its own folder.
    let b = config.program("b").unwrap();
    let conf_d = dir.path().join("conf.d");
    assert_eq!(b.cwd.as_deref(), Some(conf_d.join("data").as_path()));
    let run = conf_d.join("run").display().to_string();
    assert_eq!(b.command, CommandSpec::Argv(vec![run]));
}

#[test]
fn a_problem_in_an_included_file_is_located_in_that_file() {
    let (dir, main) = include_tree(
        "include = [\"conf.d/*.toml\"]\n",
        &[(
            "conf.d/web.toml",
            "# the web program\n[program.web]\ncommand = [\"web\"]\nworker = 2\nnice = 40\n",
        )],
    );
    let file = dir.path().join("conf.d/web.toml").display().to_string();
    assert_eq!(
        load_lines(&main),
        [
            format!(
                "{file}:4:1: program.web.worker: unknown key `worker`, did you mean `workers`?"
            ),
            format!("{file}:5:8: program.web.nice: must be between -20 and 19, found 40"),
        ]
    );
}

#[test]
fn a_name_defined_in_two_files_is_an_error_naming_both() {
    let (dir, main) = include_tree(
        &format!("include = [\"conf.d/*.toml\"]\n{WEB}[queue.q]\n"),
        &[
            ("conf.d/a.toml", "[program.web]\ncommand = [\"other\"]\n"),
            ("conf.d/b.toml", "\n[queue.q]\n"),
        ],
    );
    let root = dir.path().display();
    assert_eq!(
        load_lines(&main),
        [
            format!(
                "{root}/conf.d/a.toml:1:10: program.web: program `web` is already defined in \
                 {root}/plumule.toml:2:10"
            ),
            format!(
                "{root}/conf.d/b.toml:2:8: queue.q: queue `q` is already defined in \
                 {root}/plumule.toml:4:8"
            ),
        ]
    );
}

#[test]
fn included_files_hold_programs_and_queues_only() {
    let (dir, main) = include_tree(
        "include = [\"a.toml\"]\n",
        &[(
            "a.toml",
            "include = [\"b.toml\"]\n[plumule]\nlog_level = \"debug\"\n",
        )],
    );
    let file = dir.path().join("a.toml").display().to_string();
    assert_eq!(
        load_lines(&main),
        [
            format!(
                "{file}:1:1: include: an included file cannot include others: list every \
                 pattern in the main file"
            ),
            format!(
                "{file}:2:2: plumule: `[plumule]` belongs in the main file, not in an included one"
            ),
        ]
    );
}

#[test]
fn include_patterns_that_cannot_be_read_are_located_at_the_pattern() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, main) = include_tree(
        "include = [\n  \"missing.toml\",\n  \"*/x.toml\",\n  \"open.toml\",\n  \"plumule.toml\",\n  \"*.toml\",\n]\n",
        &[("open.toml", "")],
    );
    let open = dir.path().join("open.toml");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o666)).unwrap();
    let lines = load_lines(&main);
    let main_shown = main.display().to_string();
    assert_eq!(lines.len(), 3, "{lines:#?}");
    assert!(
        lines[0].starts_with(&format!("{main_shown}:2:3: include: cannot include "))
            && lines[0].contains("missing.toml: cannot read the configuration file: No such file"),
        "{lines:#?}"
    );
    assert!(
        lines[1].starts_with(&format!("{main_shown}:3:3: include: wildcards")),
        "{lines:#?}"
    );
    // The file that others can write is refused like the main file would be; the main file
    // matched by its own pattern, and a file named twice, are read once.
    assert!(
        lines[2].starts_with(&format!("{main_shown}:4:3: include: cannot include "))
            && lines[2].contains("refusing a configuration file writable by"),
        "{lines:#?}"
    );
    assert_eq!(
        problem("include = \"conf.d/*.toml\"\n"),
        line("1:11: include: invalid type: string \"conf.d/*.toml\", expected an array")
    );
}

// ---- Bounds on what a file may ask for (README "Limits"). ----

/// Issue 14: 20 000 programs of 10 000 workers each were accepted.
#[test]
fn total_workers_across_programs_are_bounded() {
    let mut text = String::new();
    for name in ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k"] {
        text.push_str(&format!(
            "[program.{name}]\ncommand = \"x\"\nworkers = 10000\n"
        ));
    }
    assert_eq!(
        problems(&text),
        [line(
            "33:11: program.k.workers: the programs ask for 110000 workers in all, above the \
             limit of 100000 workers across all programs"
        )]
    );
    // Exactly the limit is fine.
    let at_limit: String = (0..10)
        .map(|i| format!("[program.p{i}]\ncommand = \"x\"\nworkers = 10000\n"))
        .collect();
    let config = ok(&at_limit);
    let total: u64 = config.programs.iter().map(|p| u64::from(p.workers)).sum();
    assert_eq!(total, MAX_TOTAL_WORKERS);
}

#[test]
fn programs_and_queues_are_bounded_in_number() {
    let programs: String = (0..=10_000)
        .map(|i| format!("[program.p{i:05}]\ncommand = \"x\"\nworkers = 0\n"))
        .collect();
    assert_eq!(
        problem(&programs),
        line("30001:10: program.p10000: more than 10000 programs: the limit is 10000")
    );
    let queues: String = (0..=10_000).map(|i| format!("[queue.q{i:05}]\n")).collect();
    assert_eq!(
        problem(&queues),
        line("10001:8: queue.q10000: more than 10000 queues: the limit is 10000")
    );
}

/// Issue 14: a 50 MiB `env` value was accepted, and could only fail at exec.
#[test]
fn environment_strings_stay_under_the_kernel_limits() {
    // NAME=VALUE with its NUL is exactly 128 KiB: the largest the kernel takes.
    let fits = "v".repeat(MAX_ARG_STRING - "A=".len());
    ok(&format!("{WEB}env = {{ A = \"{fits}\" }}\n"));
    let over = format!("{fits}v");
    assert_eq!(
        problem(&format!("{WEB}env = {{ A = \"{over}\" }}\n")),
        line(&format!(
            "3:13: program.web.env.A: the variable (NAME=VALUE) is 131072 bytes long, above the \
             limit of {MAX_ARG_STRING} bytes for one argument or environment string (the \
             kernel's MAX_ARG_STRLEN, 128 KiB with its NUL); pass large data in a file"
        ))
    );
    // 2 MiB: too long for one string, and for the share of ARG_MAX.
    let big = "v".repeat(2 << 20);
    let all = problems(&format!("{WEB}env = {{ A = \"{big}\" }}\n"));
    assert_eq!(all.len(), 2, "{all:?}");
    assert!(all[0].contains("half of the usual ARG_MAX"), "{all:?}");
    assert!(all[1].contains("MAX_ARG_STRLEN"), "{all:?}");
    // One argument of the command, and a shell command line, likewise.
    let over = "v".repeat(MAX_ARG_STRING + 1);
    ok(&format!(
        "[program.web]\ncommand = [\"/bin/x\", \"{}\"]\n",
        &over[1..]
    ));
    let p = problem(&format!(
        "[program.web]\ncommand = [\"/bin/x\", \"{over}\"]\n"
    ));
    assert!(
        p.starts_with(&line(
            "2:22: program.web.command: the argument is 131072 bytes long"
        )),
        "{p}"
    );
    let p = problem(&format!("[program.web]\ncommand = \"{over}\"\n"));
    assert!(
        p.starts_with(&line(
            "2:11: program.web.command: the command is 131072 bytes long"
        )),
        "{p}"
    );
}

#[test]
fn environment_and_argv_together_stay_under_a_share_of_arg_max() {
    // Ten variables of 100 000 bytes: each fits, together they take more than 1 MiB.
    let value = "v".repeat(100_000);
    let vars: Vec<String> = (0..11).map(|i| format!("V{i} = \"{value}\"")).collect();
    let text = format!("{WEB}env = {{ {} }}\n", vars.join(", "));
    let p = problem(&text);
    assert!(
        p.starts_with(&line("3:1: program.web.env: `command` and `env` take 1100")),
        "{p}"
    );
    assert!(
        p.contains(&format!("above the limit of {MAX_ARGS_TOTAL} bytes")),
        "{p}"
    );
    let vars: Vec<String> = (0..10).map(|i| format!("V{i} = \"{value}\"")).collect();
    ok(&format!("{WEB}env = {{ {} }}\n", vars.join(", ")));
}

/// Issue 14: "99999999999999h" was a valid duration, shown by `status` as 212717826 years.
#[test]
fn durations_are_at_most_ten_years() {
    assert_eq!(
        problem(&format!("{WEB}stop_timeout = \"99999999999999h\"\n")),
        line(
            "3:16: program.web.stop_timeout: duration \"99999999999999h\" is longer than the \
             limit of 10years"
        )
    );
    let c = ok(&format!(
        "{WEB}healthy_after = \"10years\"\n[queue.q]\njob_timeout = \"3650d\"\n"
    ));
    assert_eq!(c.programs[0].healthy_after, MAX_DURATION);
    assert_eq!(
        c.queues[0].job_timeout,
        Some(Duration::from_secs(3650 * 86400))
    );
    // Every duration key goes through the same check, nested ones included.
    for key in [
        "backoff = { max = \"11years\" }",
        "start_limit = { interval = \"11years\" }",
        "watchdog = \"11years\"",
        "ready_timeout = \"11years\"",
    ] {
        let p = problem(&format!("{WEB}{key}\n"));
        assert!(p.contains("longer than the limit of 10years"), "{key}: {p}");
    }
    let p = problem("[plumule]\nshutdown_timeout = \"4000d\"\n");
    assert!(p.contains("longer than the limit"), "{p}");
}

// ---- Keys of the cluster features (SPEC §2, §10). ----

#[test]
fn node_defaults_to_the_host_name_and_is_checked() {
    assert_eq!(ok("").node, HOSTNAME);
    assert_eq!(
        ok("[plumule]\nnode = \"web-1.example\"\n").node,
        "web-1.example"
    );
    assert_eq!(
        problem("[plumule]\nnode = \"web 1\"\n"),
        line(
            "2:8: plumule.node: invalid node name \"web 1\": use 1 to 253 characters among \
             A-Z a-z 0-9 . _ -"
        )
    );
    assert!(problem("[plumule]\nnode = \"\"\n").contains("invalid node name"));
}

#[test]
fn cluster_is_read_and_checked() {
    let text = "[plumule]\ncluster = { etcd = [\"http://127.0.0.1:2379\"], lease = \"5s\" }\n";
    assert_eq!(
        ok(text).cluster,
        Some(Cluster {
            etcd: vec!["http://127.0.0.1:2379".into()],
            lease: Duration::from_secs(5),
        })
    );
    assert_eq!(
        ok("[plumule]\ncluster = { etcd = [\"https://e:2379\"] }\n")
            .cluster
            .unwrap()
            .lease,
        Duration::from_secs(10)
    );
    let bad = "[plumule]\ncluster = { etcd = [\"127.0.0.1:2379\"], lease = \"500ms\", ttl = 1 }\n";
    assert_eq!(
        parse_all(bad)
            .unwrap_err()
            .to_string()
            .lines()
            .collect::<Vec<_>>(),
        [
            line(
                "2:21: plumule.cluster.etcd: invalid etcd endpoint \"127.0.0.1:2379\": expected \
                 an http:// or https:// URL like \"http://127.0.0.1:2379\""
            ),
            line("2:48: plumule.cluster.lease: must be at least 1s"),
            line("2:57: plumule.cluster.ttl: unknown key `ttl`; expected one of `etcd`, `lease`"),
        ]
    );
    assert_eq!(
        parse_all("[plumule]\ncluster = { lease = \"5s\" }\n")
            .unwrap_err()
            .to_string(),
        line(
            "2:11: plumule.cluster.etcd: missing key `etcd`: the endpoints, like \
             [\"http://127.0.0.1:2379\"]"
        )
    );
}

#[test]
fn queue_backend_keys_are_read_and_checked() {
    let text = "[queue.q]\nbackend = \"redis://127.0.0.1:6379/0\"\nclaim_after = \"1m\"\n\
                partitions = 8\n";
    let q = &ok(text).queues[0];
    assert_eq!(q.backend.as_deref(), Some("redis://127.0.0.1:6379/0"));
    assert_eq!(q.claim_after, Duration::from_secs(60));
    assert_eq!(q.partitions, 8);
    assert_eq!(
        problem("[queue.q]\nbackend = \"redis://:pw@127.0.0.1:6379/zero\"\n"),
        line("2:11: queue.q.backend: not a usable Redis URL: Invalid database number - InvalidClientConfig")
    );
    let q = &ok("[queue.q]\nbackend = \"unix:///run/redis.sock\"\n").queues[0];
    assert_eq!(q.backend.as_deref(), Some("unix:///run/redis.sock"));
    // Without a backend, the other two are accepted (they mean nothing then).
    let q = &parse_now("[queue.q]\nclaim_after = \"1m\"\npartitions = 8\n")
        .unwrap()
        .queues[0];
    assert_eq!((q.claim_after, q.partitions), (Duration::from_secs(60), 8));
    assert_eq!(
        parse_all("[queue.q]\nbackend = \"mysql://x\"\nclaim_after = \"0s\"\npartitions = 0\n")
            .unwrap_err()
            .to_string()
            .lines()
            .collect::<Vec<_>>(),
        [
            line("2:11: queue.q.backend: expected a Redis URL like \"redis://127.0.0.1:6379/0\""),
            line("3:15: queue.q.claim_after: must be longer than 0"),
            line("4:14: queue.q.partitions: must be between 1 and 65536, found 0"),
        ]
    );
}

#[test]
fn cluster_locks_need_a_cluster_and_a_stop_timeout_shorter_than_the_lease() {
    const CLUSTER: &str =
        "[plumule]\ncluster = { etcd = [\"http://127.0.0.1:2379\"], lease = \"5s\" }\n";
    let text = format!(
        "{CLUSTER}{WEB}stop_timeout = \"4s\"\nlocks = [{{ name = \"leader\", cluster = true }}]\n"
    );
    let c = parse_now(&text).unwrap();
    assert_eq!(
        c.programs[0].locks,
        [LockSpec {
            name: "leader".into(),
            shared: false,
            cluster: true,
        }]
    );
    // stop_timeout defaults to 10s: not shorter than the 5s lease.
    let text = format!("{CLUSTER}{WEB}locks = [{{ name = \"leader\", cluster = true }}]\n");
    let p = problem(&text);
    assert!(
        p.contains("program.web.stop_timeout: must be shorter than the cluster lease (5s)"),
        "{p}"
    );
    // No cluster at all.
    let text = format!("{WEB}locks = [{{ name = \"leader\", cluster = true }}]\n");
    let p = problem(&text);
    assert!(
        p.contains("program.web.locks: lock `leader` is a cluster lock, which needs `cluster`"),
        "{p}"
    );
    // Never shared.
    let text = format!(
        "{CLUSTER}{WEB}stop_timeout = \"1s\"\nlocks = [{{ name = \"l\", cluster = true, shared = true }}]\n"
    );
    assert!(problem(&text).contains("a cluster lock cannot be shared"));
    // `cluster = false` is an ordinary lock; a string is a type error.
    let c = parse_now(&format!(
        "{WEB}locks = [{{ name = \"l\", cluster = false }}]\n"
    ))
    .unwrap();
    assert_eq!(c.programs[0].locks[0].name, "l");
    assert!(!c.programs[0].locks[0].cluster);
    assert!(problem(&format!(
        "{WEB}locks = [{{ name = \"l\", cluster = \"yes\" }}]\n"
    ))
    .contains("expected a boolean"));
    assert!(unsupported(&["program", "w", "locks", "cluster"], Some("true")).is_none());
    assert!(unsupported(&["plumule", "cluster"], None).is_none());
}

// ---- The per-user folder in /tmp. ----

#[test]
fn the_private_tmp_folder_is_checked_only_when_a_default_uses_it() {
    use std::cell::RefCell;
    let checked: RefCell<Vec<PathBuf>> = RefCell::new(Vec::new());
    let private_dir = |dir: &Path, euid: u32| {
        assert_eq!(euid, 1000);
        checked.borrow_mut().push(dir.to_path_buf());
        Err("refusing it".to_owned())
    };
    let parse = |text: &str, vars: &[(&str, &str)]| {
        let var = |name: &str| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| OsString::from(v))
        };
        let host = Host {
            var: &var,
            euid: 1000,
            hostname: HOSTNAME,
            private_dir: &private_dir,
        };
        parse_with(text, Path::new(FILE), &host, UNSUPPORTED)
    };
    let err = parse("", &[("HOME", "/home/u")]).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{FILE}: plumule.runtime_dir: refusing it")
    );
    assert_eq!(*checked.borrow(), [PathBuf::from("/tmp/plumule-1000")]);
    // Located at [plumule] when there is one.
    let err = parse("[plumule]\nlog_level = \"info\"\n", &[("HOME", "/home/u")]).unwrap_err();
    assert_eq!(
        err.to_string(),
        line("1:2: plumule.runtime_dir: refusing it")
    );
    // The state dir alone in /tmp (no HOME) is checked too.
    assert!(parse("[plumule]\nruntime_dir = \"/r\"\n", &[]).is_err());
    checked.borrow_mut().clear();
    parse(
        "",
        &[("XDG_RUNTIME_DIR", "/run/user/1000"), ("HOME", "/home/u")],
    )
    .unwrap();
    parse("[plumule]\nruntime_dir = \"/r\"\n", &[("HOME", "/home/u")]).unwrap();
    assert!(checked.borrow().is_empty());
}

/// The real check, on folders made for it (the tests run as root in CI; the owner cases need
/// root to give a folder away).
#[test]
fn check_private_dir_creates_a_private_folder_and_refuses_others() {
    use std::os::unix::fs::PermissionsExt;
    let base = tempfile::tempdir().unwrap();
    let euid = nix::unistd::geteuid().as_raw();
    let dir = base.path().join("plumule-x");
    check_private_dir(&dir, euid).unwrap();
    let meta = std::fs::symlink_metadata(&dir).unwrap();
    assert!(meta.is_dir());
    assert_eq!(meta.permissions().mode() & 0o777, 0o700);
    // Again: it exists and is ours.
    check_private_dir(&dir, euid).unwrap();

    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let err = check_private_dir(&dir, euid).unwrap_err();
    assert!(
        err.contains("others may write to it (mode 1777)") && err.contains("chmod go-w"),
        "{err}"
    );
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o770)).unwrap();
    assert!(check_private_dir(&dir, euid).is_err());
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    check_private_dir(&dir, euid).unwrap();

    // Owned by someone else.
    let err = check_private_dir(&dir, euid + 1).unwrap_err();
    assert!(
        err.contains(&format!(
            "belongs to uid {euid}, not to you (uid {})",
            euid + 1
        )) && err.contains("remove it"),
        "{err}"
    );

    // A symbolic link to a good folder is refused, not followed.
    let link = base.path().join("plumule-link");
    std::os::unix::fs::symlink(&dir, &link).unwrap();
    assert!(check_private_dir(&link, euid)
        .unwrap_err()
        .contains("not a directory"));
}

/// Found by `fuzz/fuzz_targets/config.rs`: a dotted key inside an inline table makes a table
/// of its own that toml gives no span, and the problem had no location at all. Like a dotted
/// table elsewhere, it is located at its first key (`x`).
#[test]
fn fuzz_regression_dotted_key_in_an_inline_table_is_located() {
    let text = format!("{WEB}backoff = {{ initial = \"1s\", multiplier.x = 0 }}\n");
    assert_eq!(
        problem(&text),
        line("3:40: program.web.backoff.multiplier: invalid type: table, expected a number")
    );
}

// ---- Credentials in refused values (SPEC §7). ----

#[test]
fn mask_credentials_hides_passwords_in_urls() {
    for (text, masked) in [
        ("redis://:s3cret@host/0", "redis://:***@host/0"),
        (
            "redis://user:s3cret@host:6379/0",
            "redis://user:***@host:6379/0",
        ),
        ("rediss://tok3n@host", "rediss://***@host"),
        (
            "\"http://root:pw@e:2379\", \"https://e2\"",
            "\"http://root:***@e:2379\", \"https://e2\"",
        ),
        (
            "redis://host/0?db=1&password=s3cret",
            "redis://host/0?db=1&password=***",
        ),
        // Unescaped `/`, `?` or `@` in a password: masked whole all the same.
        ("redis://:pa/s?s@word@host/0", "redis://:***@host/0"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        (
            "expected an http:// or https:// URL",
            "expected an http:// or https:// URL",
        ),
        ("no URL at all", "no URL at all"),
    ] {
        assert_eq!(mask_credentials(text), masked, "{text}");
    }
}

#[test]
fn refused_backend_and_etcd_urls_never_show_their_password() {
    // Refused as not supported yet, and with a wrong scheme or type: each message that would
    // quote the value masks its secret.
    let text = "[plumule]\ncluster = { etcd = [\"ftp://root:s3cret@e:2379\"] }\n\
                [queue.q]\nbackend = \"rediss://:s3cret@host/0\"\n\
                [queue.r]\nbackend = \"redis://:s3cret@host/0\"\n";
    let all = problems(text);
    assert!(all.iter().all(|p| !p.contains("s3cret")), "{all:#?}");
    assert!(
        all.iter()
            .any(|p| p.contains("invalid etcd endpoint \"ftp://root:***@e:2379\"")),
        "{all:#?}"
    );
    let text = "[plumule]\ncluster = { etcd = \"http://root:s3cret@e:2379\" }\n";
    let all = problems(text);
    assert!(all.iter().all(|p| !p.contains("s3cret")), "{all:#?}");
    assert!(
        all.iter()
            .any(|p| p.contains("invalid type: string \"http://root:***@e:2379\"")),
        "{all:#?}"
    );
}
