//! The man page plumule(1), in roff, as `plumule man` prints it.
//!
//! The parts that follow the command line (title, NAME, SYNOPSIS, the global OPTIONS, and
//! COMMANDS with every argument) are generated from the clap definitions, so they cannot
//! drift from what parses; hidden commands (none today) would be left out. The rest
//! (CONFIGURATION, FILES, SIGNALS, EXIT STATUS, ENVIRONMENT, EXAMPLES) is written here and
//! states what the code does: the README is the longer version of the same facts.

use std::io::{self, Write};

use clap::{Arg, ArgAction};
use clap_mangen::roff::{bold, italic, roman, Inline, Roff};

/// The section headings, in order. Tests check that each one is present.
pub const SECTIONS: &[&str] = &[
    "NAME",
    "SYNOPSIS",
    "DESCRIPTION",
    "OPTIONS",
    "COMMANDS",
    "CONFIGURATION",
    "FILES",
    "SIGNALS",
    "EXIT STATUS",
    "ENVIRONMENT",
    "EXAMPLES",
    "SEE ALSO",
];

/// Writes the whole page for `cmd` (the `plumule` command) to `out`.
pub fn render(cmd: clap::Command, out: &mut dyn Write) -> io::Result<()> {
    let mut cmd = cmd;
    cmd.build();
    let man = clap_mangen::Man::new(cmd.clone())
        .title("PLUMULE")
        .manual("plumule manual");

    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    let mut roff = Roff::new();
    synopsis(&mut roff, &cmd);
    description(&mut roff);
    page.extend(body(&roff));
    man.render_options_section(&mut page)?;

    let mut roff = Roff::new();
    commands(&mut roff, &cmd);
    configuration(&mut roff);
    files(&mut roff);
    signals(&mut roff);
    exit_status(&mut roff);
    environment(&mut roff);
    examples(&mut roff);
    see_also(&mut roff);
    page.extend(body(&roff));

    out.write_all(&strip_repeated_preambles(&page))
}

/// `roff` rendered (apostrophes handled), as bytes.
fn body(roff: &Roff) -> Vec<u8> {
    roff.render().into_bytes()
}

/// Every render of the roff crate starts with the same two lines that define `\*(Aq` (an
/// apostrophe); the page is made of several renders, so it keeps only the first of them.
fn strip_repeated_preambles(page: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(page);
    let mut out = String::with_capacity(text.len());
    let mut seen = false;
    let mut lines = text.split_inclusive('\n').peekable();
    while let Some(line) = lines.next() {
        if line.starts_with(".ie \\n(.g .ds Aq") {
            let pair_end = lines.next_if(|l| l.starts_with(".el .ds Aq"));
            if !seen {
                out.push_str(line);
                if let Some(end) = pair_end {
                    out.push_str(end);
                }
                seen = true;
            }
            continue;
        }
        out.push_str(line);
    }
    out.into_bytes()
}

/// A tagged paragraph: `term` on its own line, `text` indented below it.
fn item(roff: &mut Roff, term: impl Into<Vec<Inline>>, text: &str) {
    roff.control("TP", []);
    roff.text(term);
    roff.text([roman(text)]);
}

fn paragraph(roff: &mut Roff, text: &str) {
    roff.control("PP", []);
    roff.text([roman(text)]);
}

/// Literal lines (a config or shell excerpt), unfilled and indented.
fn example(roff: &mut Roff, lines: &str) {
    roff.control("PP", []);
    roff.control("RS", ["4"]);
    roff.control("nf", []);
    for line in lines.lines() {
        roff.text([roman(line)]);
    }
    roff.control("fi", []);
    roff.control("RE", []);
}

/// The global options with their values (clap_mangen's synopsis leaves the values out),
/// then the two ways to ask for help.
fn synopsis(roff: &mut Roff, cmd: &clap::Command) {
    roff.control("SH", ["SYNOPSIS"]);
    let mut line = vec![bold(cmd.get_name())];
    for arg in cmd
        .get_arguments()
        .filter(|a| a.is_global_set() && !a.is_hide_set())
    {
        line.push(roman(" "));
        line.extend(usage(arg));
    }
    line.push(roman(" "));
    line.push(italic("COMMAND"));
    line.push(roman(" ["));
    line.push(italic("ARGS"));
    line.push(roman("]"));
    roff.text(line);
    roff.control("br", []);
    roff.text([
        bold(cmd.get_name()),
        roman(" "),
        italic("COMMAND"),
        roman(" "),
        bold("--help"),
    ]);
    roff.control("br", []);
    roff.text([bold(cmd.get_name()), roman(" "), bold("--version")]);
}

fn description(roff: &mut Roff) {
    roff.control("SH", ["DESCRIPTION"]);
    roff.text([
        bold("plumule"),
        roman(
            " is a multi-process daemon supervisor for Linux. A single-threaded master \
             (plumule run) forks the worker processes declared in a TOML file, restarts the \
             ones that crash (with backoff), shares jobs with them over pipes (queues with \
             acknowledgements, retries and dead letters), holds file locks for them, speaks \
             systemd's notify protocol, and reloads its configuration on SIGHUP without touching what \
             did not change. It runs in the foreground and never daemonizes itself: systemd \
             or a terminal owns it.",
        ),
    ]);
    paragraph(
        roff,
        "status, reload, start, stop, restart, scale, signal, shutdown, logs, submit, queue, \
         requeue and members are clients: they talk to a \
         running master over its control socket and return once the action is done. check, \
         lock, completions and man need no master.",
    );
    paragraph(
        roff,
        "Every command accepts -c/--config FILE and --socket PATH, before or after the \
         command. The config file is found as described under FILES. Client commands find \
         the master's socket through --socket, then -c FILE (the control.sock of its \
         runtime_dir), then $PLUMULE_SOCKET, then the config file found as usual. They read \
         only runtime_dir from the file, so plumule reload still reaches the master after \
         the file has been edited into something invalid, and reports the error.",
    );
}

/// Every shown subcommand of `cmd` (built), with a synopsis and each of its own arguments.
fn commands(roff: &mut Roff, cmd: &clap::Command) {
    roff.control("SH", ["COMMANDS"]);
    let name = cmd.get_name();
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        // clap's own `help` subcommand is what --help is.
        if sub.get_name() == "help" {
            continue;
        }
        let args: Vec<&Arg> = own_args(sub).collect();
        let mut synopsis = vec![bold(format!("{name} {}", sub.get_name()))];
        for arg in args.iter().filter(|a| !a.is_positional()) {
            synopsis.push(roman(" "));
            synopsis.extend(usage(arg));
        }
        for arg in args.iter().filter(|a| a.is_positional()) {
            synopsis.push(roman(" "));
            synopsis.extend(usage(arg));
        }
        roff.control("SS", []);
        roff.text(synopsis);
        if let Some(about) = sub.get_long_about().or_else(|| sub.get_about()) {
            roff.text([roman(plain(&about.to_string()))]);
        }
        if args.is_empty() {
            continue;
        }
        roff.control("RS", []);
        for arg in &args {
            let mut term = usage(arg);
            if let Some(default) = default_value(arg) {
                term.push(roman(format!(" (default: {default})")));
            }
            let mut help = arg
                .get_long_help()
                .or_else(|| arg.get_help())
                .map(|h| plain(&h.to_string()))
                .unwrap_or_default();
            let values: Vec<String> = arg
                .get_possible_values()
                .iter()
                .filter(|v| !v.is_hide_set())
                .map(|v| v.get_name().to_owned())
                .collect();
            if !values.is_empty() {
                help.push_str(&format!(" (one of: {})", values.join(", ")));
            }
            item(roff, term, &help);
        }
        roff.control("RE", []);
    }
}

/// A help text without the backticks that mark names in `--help`.
fn plain(text: &str) -> String {
    text.replace('`', "")
}

/// The arguments a subcommand defines itself: not the global ones, not --help or --version.
fn own_args(sub: &clap::Command) -> impl Iterator<Item = &Arg> {
    sub.get_arguments().filter(|a| {
        !a.is_hide_set()
            && !a.is_global_set()
            && !matches!(
                a.get_action(),
                ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
            )
    })
}

/// How an argument is written: `[--lines LINES]`, `TARGET`, `[PROGRAM]`, `-- CMD...`.
fn usage(arg: &Arg) -> Vec<Inline> {
    let value = arg
        .get_value_names()
        .and_then(|v| v.first())
        .map(|v| v.to_string())
        .unwrap_or_else(|| arg.get_id().as_str().to_uppercase());
    let many = matches!(arg.get_action(), ArgAction::Append);
    let mut parts = Vec::new();
    if arg.is_positional() {
        if arg.is_last_set() {
            parts.push(bold("--"));
            parts.push(roman(" "));
        }
        parts.push(italic(value));
        if many {
            parts.push(roman("..."));
        }
    } else {
        let flag = match (arg.get_short(), arg.get_long()) {
            (Some(s), Some(l)) => format!("-{s}|--{l}"),
            (Some(s), None) => format!("-{s}"),
            (None, Some(l)) => format!("--{l}"),
            (None, None) => String::new(),
        };
        parts.push(bold(flag));
        if takes_value(arg) {
            parts.push(roman(" "));
            parts.push(italic(value));
        }
    }
    if !arg.is_required_set() {
        parts.insert(0, roman("["));
        parts.push(roman("]"));
    }
    parts
}

fn takes_value(arg: &Arg) -> bool {
    !matches!(
        arg.get_action(),
        ArgAction::SetTrue | ArgAction::SetFalse | ArgAction::Count
    )
}

/// The default of an option that takes a value (a flag's "false" goes without saying).
fn default_value(arg: &Arg) -> Option<String> {
    let defaults = arg.get_default_values();
    if defaults.is_empty() || arg.is_hide_default_value_set() || !takes_value(arg) {
        return None;
    }
    let values: Vec<String> = defaults
        .iter()
        .map(|v| v.to_string_lossy().into_owned())
        .collect();
    Some(values.join(","))
}

/// One key of the file: `name = example`, its default, and what it does.
fn key(roff: &mut Roff, name: &str, default: &str, text: &str) {
    let mut term = vec![bold(name)];
    if !default.is_empty() {
        term.push(roman(format!(" (default: {default})")));
    }
    item(roff, term, text);
}

fn configuration(roff: &mut Roff) {
    roff.control("SH", ["CONFIGURATION"]);
    roff.text([roman(
        "The file is TOML: one [plumule] table for the master, one [program.NAME] table \
         per program and one [queue.NAME] table per job queue. Unknown keys, wrong types, \
         unknown signals, bad names, an after naming an unknown program or forming a cycle, \
         users or groups that do not exist: all are errors, every one reported at once as \
         FILE:LINE:COL: KEY: message, with a suggestion when one is obvious. plumule check prints what a file resolves to.",
    )]);
    paragraph(
        roff,
        "Durations are strings only (\"250ms\", \"10s\", \"1h 30m\"; a bare number is refused \
         with the string to write). Sizes are strings like \"10MiB\" (B, KB, MB, GB, TB are \
         powers of 1000; KiB, MiB, GiB, TiB powers of 1024). Signals are names, case ignored, \
         SIG prefix optional (\"TERM\", \"SIGTERM\", \"term\"). umask and a listen mode are \
         octal strings (\"022\", \"0660\"). Relative paths resolve against the folder of the \
         config file. Program names are [A-Za-z0-9_-]{1,64}; lock names are \
         [A-Za-z0-9._-]{1,100}, not starting with a dot, after {worker} expansion.",
    );
    paragraph(
        roff,
        "include = [\"conf.d/*.toml\"], a top-level key of the main file (before its first \
         table), merges more files: patterns relative to the main file's folder, * and ? in \
         the file name only, files read in name order (dot files only for a pattern starting \
         with a dot). A pattern without wildcards must name an existing file; one with \
         wildcards may match nothing. Included files hold [program.NAME] and [queue.NAME] \
         tables only (no [plumule], no include); their relative paths resolve against their \
         own folder, and their problems are located in them. A name defined in two files is \
         an error naming both. They pass the same ownership checks as the main file, and \
         check and reload read them again.",
    );

    roff.control("SS", ["[plumule]"]);
    key(
        roff,
        "runtime_dir",
        "",
        "The pidfile, control.sock, notify.sock and the workers record. Default: \
         $RUNTIME_DIRECTORY (set by systemd's RuntimeDirectory=), else /run/plumule for \
         root, else $XDG_RUNTIME_DIR/plumule, else /tmp/plumule-UID/run.",
    );
    key(
        roff,
        "state_dir",
        "",
        "Durable data (mode 0700). Default: $STATE_DIRECTORY, else /var/lib/plumule for \
         root, else $XDG_STATE_HOME/plumule, else ~/.local/state/plumule, else \
         /tmp/plumule-UID/state.",
    );
    key(
        roff,
        "lock_dir",
        "runtime_dir/locks",
        "The named lock files, NAME.lock. Give several masters the same lock_dir to make \
         their locks exclude each other.",
    );
    key(
        roff,
        "control_group",
        "none",
        "A group whose members may use the control socket (then mode 0660). Without it the \
         socket is 0600: only root and the master's own user.",
    );
    key(
        roff,
        "shutdown_timeout",
        "\"30s\"",
        "The whole graceful stop; after it everything left is killed.",
    );
    key(
        roff,
        "log_level",
        "\"info\"",
        "error, warn, info, debug or trace. $RUST_LOG, when set, wins.",
    );
    key(
        roff,
        "metrics",
        "",
        "tcp:HOST:PORT or unix:PATH: serve Prometheus metrics at GET /metrics there (see README).",
    );
    key(
        roff,
        "node",
        "the host name",
        "This master's name in a cluster ([A-Za-z0-9._-], at most 253 characters).",
    );
    key(
        roff,
        "cluster",
        "none",
        "{ etcd = [\"http://HOST:2379\", ...], lease = \"10s\" }: join the cluster of the masters \
         on these etcd endpoints with a lease kept alive by a helper process, and a member \
         record (plumule members). Cluster locks are held through it.",
    );
    paragraph(
        roff,
        "A reload applies log_level, shutdown_timeout and metrics at once; runtime_dir, state_dir, \
         lock_dir and control_group take effect when the master restarts (plumule reload says \
         so).",
    );

    roff.control("SS", ["[program.NAME]"]);
    key(
        roff,
        "command",
        "",
        "Required. An argv array, run without a shell ([\"/usr/bin/myapp\", \"--port\", \"8080\"]), or \
         a string, run by /bin/sh -c. A bare command name is looked up in the worker's PATH; \
         a relative path with a slash resolves against the config folder.",
    );
    key(
        roff,
        "workers",
        "1",
        "How many workers to run, 0 (declared, not running) to 10000. Each has an id from 0, \
         stable across restarts.",
    );
    key(
        roff,
        "restart",
        "\"always\"",
        "always, on-failure or never. on-failure restarts after an exit code not in \
         success_exit_codes or a death by a signal, except the stop signal plumule sent. A \
         worker not to be restarted ends in exited.",
    );
    key(
        roff,
        "success_exit_codes",
        "[0]",
        "The exit codes on-failure counts as success (0 to 255).",
    );
    key(
        roff,
        "healthy_after",
        "\"1s\"",
        "A run at least this long restarts at once and resets the backoff.",
    );
    key(
        roff,
        "backoff",
        "{ initial = \"100ms\", max = \"30s\", multiplier = 2.0, jitter = 0.1 }",
        "Every sub-key is optional. The k-th consecutive quick crash waits initial * \
         multiplier^(k-1), capped at max, plus or minus jitter of itself.",
    );
    key(
        roff,
        "start_limit",
        "none",
        "{ burst = 10, interval = \"60s\" }: more than burst starts (the first included) \
         within interval and the worker is failed; plumule start clears it. A table that \
         leaves a key out takes systemd's burst 5 or interval \"10s\".",
    );
    key(
        roff,
        "stop_signal",
        "\"TERM\"",
        "The signal that stops a worker, sent to its process group.",
    );
    key(
        roff,
        "stop_timeout",
        "\"10s\"",
        "How long a stopping worker gets before SIGKILL to its whole process group.",
    );
    key(
        roff,
        "reload",
        "\"restart\"",
        "What a reload does to this program when a key that shapes the process (command, \
         env, inherit_env, cwd, user, group, umask, listen, locks, stdout, stderr, ready, \
         watchdog, nice, oom_score_adj, limits) changed. restart: a rolling restart, one worker at a time, the successor \
         running (ready) before the old one gets its stop signal; stop then start when the \
         program holds an exclusive lock. signal: every reload sends reload_signal to each \
         worker, changed or not, and process key changes still roll them. none: changes \
         apply at each worker's next natural restart. Other keys apply in place.",
    );
    key(
        roff,
        "reload_signal",
        "\"HUP\"",
        "The signal reload = \"signal\" sends to each worker's main process.",
    );
    key(
        roff,
        "env",
        "{}",
        "Variables to set, such as { RUST_LOG = \"info\" }. It may not set the variables \
         plumule sets itself (PLUMULE_*, NOTIFY_SOCKET, LISTEN_*, WATCHDOG_*).",
    );
    key(
        roff,
        "inherit_env",
        "true",
        "Whether workers get the master's environment. With false a worker gets only env, \
         the variables plumule sets, a default PATH, and HOME, USER, LOGNAME and SHELL of \
         its user.",
    );
    key(
        roff,
        "cwd",
        "the master's",
        "The working directory of the workers.",
    );
    key(
        roff,
        "user",
        "the master's",
        "A user name or id to run as (needs a root master); supplementary groups are set \
         too.",
    );
    key(
        roff,
        "group",
        "the user's primary group",
        "A group name or id to run as.",
    );
    key(
        roff,
        "umask",
        "the master's",
        "The workers' umask, an octal string (\"022\").",
    );
    key(
        roff,
        "nice",
        "the master's",
        "Scheduling niceness, -20 to 19 (below the master's needs a root master).",
    );
    key(
        roff,
        "oom_score_adj",
        "the master's",
        "Written to /proc/self/oom_score_adj, -1000 to 1000 (lowering it needs root).",
    );
    key(
        roff,
        "limits",
        "the master's",
        "Resource limits: { nofile = 65536, nproc = 512, core = 0, memlock = \"64MiB\", \
         as = \"unlimited\" }. Each sets both the soft and the hard limit. Values are whole \
         numbers, \"unlimited\" (not for nofile), or for core, memlock and as (bytes) a size \
         string. Set in the child before it changes user, after which it could not raise \
         them; a limit the kernel refuses fails the worker with \"cannot set limit NAME to \
         N: REASON\".",
    );
    key(
        roff,
        "stdout, stderr",
        "\"log\"",
        "log: to the master's stderr, line by line, tagged PROGRAM.ID: (and kept for plumule \
         logs). inherit: the master's own stdout or stderr. null: /dev/null. { file = \
         \"...\", max_size = \"10MiB\", keep = 5 }: the master writes the file and, with \
         max_size, rotates it by size into FILE.1 (newest) to FILE.keep (keep: 1 to 1000, \
         default 5, needs max_size); SIGUSR1 reopens it.",
    );
    key(
        roff,
        "locks",
        "[]",
        "Named file locks each worker takes before it execs and holds for its whole life: \
         \"NAME\" (exclusive) or { name = \"NAME\", shared = true }. {worker} in a name \
         expands to the worker id. Several locks are taken in name order. While it waits the \
         worker is starting, detail \"waiting for lock NAME\". { name = \"NAME\", cluster = \
         true } is held through etcd across the cluster instead (needs [plumule] cluster and a \
         stop_timeout shorter than the lease): exactly one worker of the cluster runs with it, \
         with its etcd revision in PLUMULE_LOCK_REVISION_NAME, and it is SIGKILLed before its \
         master's lease can expire when the lease cannot be renewed.",
    );
    key(
        roff,
        "ready",
        "\"started\"",
        "started: a worker is running once it has exec'd. notify: only once it sends \
         READY=1 on its NOTIFY_SOCKET.",
    );
    key(
        roff,
        "ready_timeout",
        "\"30s\"",
        "With ready = \"notify\": a worker not ready by then is stopped and the start counts \
         as a quick crash.",
    );
    key(
        roff,
        "watchdog",
        "none",
        "The worker must send WATCHDOG=1 at least this often (from READY=1, or from the \
         start with ready = \"started\"); a miss gets it SIGABRT, then SIGKILL after \
         stop_timeout.",
    );
    key(
        roff,
        "listen",
        "[]",
        "Sockets the master binds and hands to every worker (fds 3, 4, ...): \
         \"tcp:HOST:PORT\", \"unix:PATH\", \"systemd:NAME\" (a socket systemd passed the \
         master), or { address = \"...\", name = \"...\", mode = \"0660\" } (name: its \
         LISTEN_FDNAMES entry, default the program's name; mode: for unix: sockets).",
    );
    key(
        roff,
        "after",
        "[]",
        "Programs whose workers must be running (ready) before this program's are forked; \
         at a stop this program stops before them.",
    );
    key(
        roff,
        "queue",
        "",
        "The queue this program's workers consume: jobs on their stdin, answers on their \
         stdout (so setting stdout on it is an error; stderr stays a log). A queue has at most \
         one consuming program.",
    );

    roff.control("SS", ["[queue.NAME]"]);
    roff.text([roman(
        "A job queue. Jobs are added with plumule submit; the master hands each one to a \
         worker of the consuming program and removes it only once the worker has answered \
         (at least once delivery). Names are [A-Za-z0-9_-]{1,64}. A queue no program \
         consumes here keeps its jobs pending.",
    )]);
    key(
        roff,
        "durable",
        "true",
        "Keep the queue on disk under state_dir/queues/NAME: submit returns once the jobs are \
         synced, and they survive a crash of the master or of the machine. false: in memory.",
    );
    key(
        roff,
        "protocol",
        "\"lines\"",
        "How jobs and answers travel, \"lines\" or \"frames\" (below).",
    );
    key(
        roff,
        "prefetch",
        "1",
        "Jobs in flight per worker, at least 1.",
    );
    key(
        roff,
        "max_attempts",
        "3",
        "Deliveries of a job before it is dead-lettered. A fail answer, a worker's death, a \
         protocol error and a job timeout each count.",
    );
    key(
        roff,
        "retry_backoff",
        "{ initial = \"1s\", max = \"1m\", multiplier = 2.0, jitter = 0.1 }",
        "The delay before a failed job is delivered again.",
    );
    key(
        roff,
        "route",
        "\"least-loaded\"",
        "Which worker gets a job: \"least-loaded\", \"round-robin\", or \"key\" (jobs with the \
         same submit --key go to the same worker, through a consistent hash ring; a job \
         without a key goes least-loaded).",
    );
    key(
        roff,
        "max_pending",
        "1000000",
        "Pending plus in-flight jobs at most; a submit batch that would cross it is refused \
         whole, with a message saying how many jobs were stored before it.",
    );
    key(
        roff,
        "max_frame",
        "\"16MiB\"",
        "frames: a larger job or answer is a protocol error.",
    );
    key(
        roff,
        "job_timeout",
        "",
        "A job in flight longer than this (from when it became its worker's oldest unanswered \
         job) gets the worker stopped; the job is redelivered, the attempt counted.",
    );
    paragraph(
        roff,
        "protocol = \"lines\": each job is one line on the worker's stdin (a payload holding \
         a newline is refused at submit). The worker answers each job, in order, with one line \
         on its stdout: \"ok\" or \"ok RESULT\", \"fail REASON\" (retried after retry_backoff \
         until max_attempts), or \"drop REASON\" (dead-lettered at once). A shell loop is a \
         worker:",
    );
    example(
        roff,
        "while read -r job; do\n  convert \"$job\" -resize 200x200 \"${job%.jpg}.thumb.jpg\" && echo ok || echo \"fail convert: $?\"\ndone",
    );
    paragraph(
        roff,
        "protocol = \"frames\": binary safe. A job is a 4-byte big-endian length L, then L \
         bytes of payload. An answer is a 4-byte big-endian length N (at least 1), one status \
         byte (0 ok, 1 fail, 2 drop), then N-1 bytes of result or reason.",
    );
    paragraph(
        roff,
        "An answer that does not parse, or more answers than jobs in flight, is a protocol \
         error: the worker is killed and restarted and its unanswered jobs are redelivered. \
         EOF on stdin asks a worker to finish what it holds and exit.",
    );
}

fn files(roff: &mut Roff) {
    roff.control("SH", ["FILES"]);
    item(
        roff,
        [italic("config file")],
        "-c FILE, else $PLUMULE_CONFIG, else ./plumule.toml, else /etc/plumule/plumule.toml. \
         check and run refuse a file writable by group or others, or owned by someone other \
         than root or the master's user.",
    );
    item(
        roff,
        [italic("runtime_dir"), roman("/plumule.pid")],
        "The master's pid and a newline. The master holds an exclusive lock on it for its \
         whole life: a second master on the same runtime_dir exits 3, naming the pid.",
    );
    item(
        roff,
        [italic("runtime_dir"), roman("/control.sock")],
        "The control socket: a Unix stream socket, one JSON object per line each way, mode \
         0600 (0660 with control_group).",
    );
    item(
        roff,
        [italic("runtime_dir"), roman("/notify.sock")],
        "The datagram socket workers get as NOTIFY_SOCKET.",
    );
    item(
        roff,
        [italic("runtime_dir"), roman("/workers")],
        "The record of the workers' process groups, with their start times: a new master on \
         the same runtime_dir stops whatever a previous one left before it starts its own.",
    );
    item(roff, [italic("state_dir")], "Durable data, mode 0700.");
    item(
        roff,
        [
            italic("lock_dir"),
            roman("/"),
            italic("NAME"),
            roman(".lock"),
        ],
        "The named lock files (flock(2)) that workers' locks and plumule lock take; opened \
         without following symbolic links, created 0644 (0664 with control_group).",
    );
    paragraph(
        roff,
        "The master creates a missing runtime_dir and lock_dir (0755) and state_dir (0700), \
         and refuses existing ones that are writable by others. A graceful stop removes the \
         pidfile, the sockets and the workers record.",
    );
}

fn signals(roff: &mut Roff) {
    roff.control("SH", ["SIGNALS"]);
    roff.text([roman("The master handles:")]);
    item(
        roff,
        [bold("SIGTERM"), roman(", "), bold("SIGINT")],
        "Graceful stop: no new control connections, STOPPING=1 to systemd, programs stopped \
         in reverse after order with their stop_signal, SIGKILL after stop_timeout (and to \
         everything left at shutdown_timeout), pidfile, sockets and workers record removed, \
         exit 0.",
    );
    item(
        roff,
        [bold("SIGHUP")],
        "Reload, as plumule reload: re-read the file; if it is invalid nothing changes and \
         the error is logged and sent to systemd as STATUS=; if it is valid, the difference \
         is applied (see reload under CONFIGURATION).",
    );
    item(
        roff,
        [bold("SIGUSR1")],
        "Reopen the output files of stdout/stderr = { file = ... } (for logrotate).",
    );
    item(
        roff,
        [bold("SIGCHLD")],
        "Reap exited children (the master is also the subreaper of its workers' orphans).",
    );
    paragraph(roff, "Workers receive:");
    item(
        roff,
        [italic("stop_signal")],
        "(default SIGTERM) to the worker's process group when it is stopped (plumule stop, \
         restart, scale down, a reload, the master's graceful stop), then SIGKILL to the \
         group after stop_timeout.",
    );
    item(
        roff,
        [italic("reload_signal")],
        "(default SIGHUP) to the main process at every reload, with reload = \"signal\".",
    );
    item(
        roff,
        [bold("SIGABRT")],
        "When a watchdog is missed; SIGKILL to the group after stop_timeout.",
    );
    item(
        roff,
        [bold("SIGTERM")],
        "When the master dies, even by SIGKILL (the parent-death signal).",
    );
    item(
        roff,
        [bold("SIGKILL")],
        "To what is left of a worker's process group once its main process has exited, \
         before the replacement starts.",
    );
    paragraph(
        roff,
        "Each worker starts with default signal dispositions and an empty signal mask, in \
         its own process group.",
    );
}

fn exit_status(roff: &mut Roff) {
    roff.control("SH", ["EXIT STATUS"]);
    item(roff, [bold("0")], "Success.");
    item(
        roff,
        [bold("1")],
        "An error, with a message on stderr: an invalid config, an unknown program (\"no \
         program named ...\"), no master running, a submit batch refused, a job of \
         submit --wait that ended dead.",
    );
    item(roff, [bold("2")], "A usage error.");
    item(
        roff,
        [bold("3")],
        "run: another master already owns this runtime_dir (the message names its pid). \
         status: a worker is failed.",
    );
    item(
        roff,
        [bold("75")],
        "lock: the lock could not be taken (--nonblock, or --timeout expired).",
    );
    paragraph(
        roff,
        "Otherwise plumule lock passes CMD's exit status through: 128+N when CMD died of \
         signal N, 126 when it cannot be run, 127 when it is not found.",
    );
}

fn environment(roff: &mut Roff) {
    roff.control("SH", ["ENVIRONMENT"]);
    roff.text([roman("plumule reads:")]);
    item(
        roff,
        [bold("PLUMULE_CONFIG")],
        "The config file when there is no -c.",
    );
    item(
        roff,
        [bold("PLUMULE_SOCKET")],
        "The control socket for client commands given neither --socket nor -c.",
    );
    item(
        roff,
        [
            bold("RUNTIME_DIRECTORY"),
            roman(", "),
            bold("STATE_DIRECTORY"),
            roman(", "),
            bold("XDG_RUNTIME_DIR"),
            roman(", "),
            bold("XDG_STATE_HOME"),
            roman(", "),
            bold("HOME"),
        ],
        "The default runtime_dir and state_dir (see CONFIGURATION).",
    );
    item(
        roff,
        [bold("NOTIFY_SOCKET")],
        "systemd's notify socket: the master sends READY=1, RELOADING=1, STOPPING=1, STATUS= \
         and WATCHDOG=1 to it. Without it the master sends nothing.",
    );
    item(
        roff,
        [
            bold("LISTEN_FDS"),
            roman(", "),
            bold("LISTEN_PID"),
            roman(", "),
            bold("LISTEN_FDNAMES"),
        ],
        "Sockets systemd passes the master by socket activation; listen = [\"systemd:NAME\"] \
         hands the one named NAME to workers.",
    );
    item(
        roff,
        [bold("WATCHDOG_USEC"), roman(", "), bold("WATCHDOG_PID")],
        "systemd's watchdog: the master sends WATCHDOG=1 every half WATCHDOG_USEC.",
    );
    item(
        roff,
        [bold("JOURNAL_STREAM")],
        "When it names the master's stderr (under systemd), log lines carry a <N> syslog \
         priority prefix and no timestamp; otherwise an RFC 3339 timestamp and the level.",
    );
    item(
        roff,
        [bold("RUST_LOG")],
        "The master's log filter (env_logger syntax); wins over log_level.",
    );
    paragraph(
        roff,
        "The systemd variables above and JOURNAL_STREAM describe the master and are never \
         passed on to workers. Every worker gets:",
    );
    item(roff, [bold("PLUMULE_PROGRAM")], "The program's name.");
    item(
        roff,
        [bold("PLUMULE_WORKER_ID")],
        "The worker's id, 0-based and stable across restarts.",
    );
    item(
        roff,
        [bold("PLUMULE_WORKERS")],
        "How many workers the program had when this one started.",
    );
    item(
        roff,
        [bold("NOTIFY_SOCKET")],
        "plumule's own notify socket, runtime_dir/notify.sock (never the master's).",
    );
    item(
        roff,
        [bold("WATCHDOG_USEC"), roman(", "), bold("WATCHDOG_PID")],
        "With watchdog: its period in microseconds, and the worker's own pid.",
    );
    item(
        roff,
        [
            bold("LISTEN_FDS"),
            roman(", "),
            bold("LISTEN_PID"),
            roman(", "),
            bold("LISTEN_FDNAMES"),
        ],
        "With listen: how many sockets start at fd 3, the worker's own pid, and their names \
         separated by colons.",
    );
    item(
        roff,
        [
            bold("PATH"),
            roman(", "),
            bold("HOME"),
            roman(", "),
            bold("USER"),
            roman(", "),
            bold("LOGNAME"),
            roman(", "),
            bold("SHELL"),
        ],
        "With inherit_env = false: a default PATH and the worker user's own values.",
    );
}

fn examples(roff: &mut Roff) {
    roff.control("SH", ["EXAMPLES"]);
    roff.text([roman("A config file with two programs:")]);
    example(
        roff,
        "[plumule]\n\
         log_level = \"info\"\n\
         \n\
         [program.web]\n\
         command = [\"/usr/bin/myapp\", \"--port\", \"8080\"]\n\
         workers = 4\n\
         stop_timeout = \"20s\"\n\
         \n\
         [program.cleanup]\n\
         command = \"exec /usr/local/bin/cleanup --loop\"\n\
         locks = [\"db-migrations\"]\n\
         restart = \"on-failure\"",
    );
    paragraph(roff, "Check it, then run the master in the foreground:");
    example(
        roff,
        "plumule check -c plumule.toml\nplumule run -c plumule.toml",
    );
    paragraph(roff, "From another terminal:");
    example(
        roff,
        "plumule status -c plumule.toml\n\
         plumule scale web 6 -c plumule.toml\n\
         plumule restart web.2 -c plumule.toml\n\
         plumule logs web -n 100 -f -c plumule.toml",
    );
    paragraph(
        roff,
        "A cron job that must not run while a worker holds the lock (exit 75 when it is \
         held):",
    );
    example(
        roff,
        "plumule lock db-migrations --nonblock -- /usr/local/bin/backup",
    );
    paragraph(
        roff,
        "Queue jobs, one per line of a file, then wait for two more and print their results:",
    );
    example(
        roff,
        "find /srv/photos -name '*.jpg' | plumule submit thumbnails\n\
         plumule submit thumbnails --wait a.jpg b.jpg\n\
         plumule queue\n\
         plumule queue thumbnails --dead\n\
         plumule requeue thumbnails --all",
    );
    paragraph(roff, "Install the completions and read this page:");
    example(
        roff,
        "plumule completions bash > ~/.local/share/bash-completion/completions/plumule\n\
         plumule man | man -l -",
    );
}

fn see_also(roff: &mut Roff) {
    roff.control("SH", ["SEE ALSO"]);
    roff.text([
        bold("flock"),
        roman("(1), "),
        bold("systemctl"),
        roman("(1), "),
        bold("systemd.service"),
        roman("(5), "),
        bold("sd_notify"),
        roman("(3)"),
    ]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_apostrophe_preamble() {
        let mut out = Vec::new();
        render(crate::cli::shown_command(), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.matches(".ds Aq").count(), 2, "one .ie/.el pair");
        assert!(text.starts_with(".ie "), "{}", &text[..80]);
    }
}
