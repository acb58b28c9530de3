//! The `plumule` command line (clap): the master (`run`), config checking, the client
//! commands that talk to a running master, and `plumule lock`.
//!
//! Exit codes: 0 ok, 1 error (message on stderr), 2 usage, 3 another master owns the
//! runtime dir (or, for `status`, a worker is `failed`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};

use crate::client;
use crate::config;
use crate::protocol::{Answer, Request, Response, Target};

#[derive(Debug, Parser)]
#[command(
    name = "plumule",
    version,
    about = "A multi-process daemon supervisor",
    propagate_version = true,
    subcommand_value_name = "COMMAND"
)]
pub struct Cli {
    /// The config file (default: $PLUMULE_CONFIG, ./plumule.toml, /etc/plumule/plumule.toml)
    #[arg(short = 'c', long = "config", global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The master's control socket (default: from the config's runtime dir, or $PLUMULE_SOCKET)
    #[arg(long = "socket", global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// The commands. Any marked `hide` would parse but be left out of `--help`, the man page and
/// the completion scripts (none is, today).
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the master in the foreground (it never daemonizes itself)
    Run,
    /// Validate the config file and print the resolved programs and queues
    Check {
        /// Also fail (exit 1) on warnings: what cannot run here as written (a command not
        /// found, a missing cwd, `user` or `group` without root)
        #[arg(long)]
        strict: bool,
    },
    /// One row per worker: state, pid, uptime, restarts, last exit
    Status {
        /// Show only this program's workers
        program: Option<String>,
        /// Print one JSON object (the control protocol's status answer) instead of a table
        #[arg(long)]
        json: bool,
        /// Redraw the table every INTERVAL ("2s", "500ms"; default 1s) until interrupted; exit 1
        /// when the master goes away. Not on a terminal, the tables follow each other with a
        /// blank line between them (--json: one object per line). Put PROGRAM before --watch
        #[arg(
            long,
            value_name = "INTERVAL",
            num_args = 0..=1,
            default_missing_value = "1s",
            value_parser = parse_interval
        )]
        watch: Option<Duration>,
        #[command(flatten)]
        wait: Wait<5>,
    },
    /// Re-read the config file and apply what changed (like SIGHUP)
    Reload {
        #[command(flatten)]
        quiet: Quiet,
        #[command(flatten)]
        wait: Wait<30>,
    },
    /// Start a program or one worker (PROGRAM.ID); clears `failed`
    Start {
        /// PROGRAM or PROGRAM.ID: a whole program, or one worker by its id (from 0)
        target: String,
        #[command(flatten)]
        quiet: Quiet,
        #[command(flatten)]
        wait: Wait<30>,
        #[command(flatten)]
        no_wait: NoWait,
    },
    /// Stop a program or one worker (PROGRAM.ID)
    Stop {
        /// PROGRAM or PROGRAM.ID: a whole program, or one worker by its id (from 0)
        target: String,
        #[command(flatten)]
        quiet: Quiet,
        #[command(flatten)]
        wait: Wait<30>,
    },
    /// Restart a program or one worker (PROGRAM.ID)
    Restart {
        /// PROGRAM or PROGRAM.ID: a whole program, or one worker by its id (from 0)
        target: String,
        #[command(flatten)]
        quiet: Quiet,
        #[command(flatten)]
        wait: Wait<30>,
        #[command(flatten)]
        no_wait: NoWait,
    },
    /// Change the number of workers of a program at run time
    Scale {
        /// The program to scale
        program: String,
        /// How many workers it runs from now on (until the file's `workers` for it changes)
        #[arg(value_name = "N")]
        workers: u32,
        #[command(flatten)]
        quiet: Quiet,
        #[command(flatten)]
        wait: Wait<30>,
        #[command(flatten)]
        no_wait: NoWait,
    },
    /// Send a signal to the workers of a program, or to one worker (PROGRAM.ID)
    Signal {
        /// PROGRAM or PROGRAM.ID: every running worker of a program, or one worker by its id
        target: String,
        /// The signal, by name as in the config file: HUP, SIGHUP, usr1 (case is ignored;
        /// numbers are refused, they differ across architectures)
        #[arg(value_parser = parse_signal_name)]
        signal: String,
        /// Send it to each worker's whole process group (the worker and its children), not
        /// only to the worker's main process
        #[arg(long)]
        group: bool,
        #[command(flatten)]
        quiet: Quiet,
        #[command(flatten)]
        wait: Wait<30>,
    },
    /// Stop the master gracefully (like SIGTERM) and wait until it has exited
    Shutdown {
        #[command(flatten)]
        quiet: Quiet,
        #[command(flatten)]
        wait: Wait<30>,
    },
    /// Add jobs to a queue; returns once they are stored (--wait: once they have ended)
    Submit {
        /// The queue to add the jobs to
        queue: String,
        /// The routing key of the jobs: with `route = "key"`, jobs with the same key go to
        /// the same worker
        #[arg(long, value_name = "K")]
        key: Option<String>,
        /// Wait until every job has ended and print one line per job, in order: `ok RESULT`
        /// or `dead REASON`; exit 1 when any ended dead
        #[arg(long)]
        wait: bool,
        /// The jobs, one per argument (none: one job per line of stdin, the newline left
        /// out, sent in batches as they are read)
        #[arg(value_name = "PAYLOAD")]
        payload: Vec<OsString>,
        #[command(flatten)]
        quiet: Quiet,
        #[command(flatten)]
        timeout: Wait<30>,
    },
    /// Jobs of each queue: pending, in flight, done, retried, dead-lettered
    Queue {
        /// Show only this queue
        queue: Option<String>,
        /// Print one JSON object (the control protocol's answer) instead of a table
        #[arg(long)]
        json: bool,
        /// List the dead letters of QUEUE: id, attempts, reason, payload
        #[arg(long, requires = "queue")]
        dead: bool,
        #[command(flatten)]
        wait: Wait<5>,
    },
    /// The masters of the cluster: node, host, pid, since, programs
    Members {
        /// Print one JSON object (the control protocol's answer) instead of a table
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        wait: Wait<5>,
    },
    /// Put dead letters back in their queue, all of them or by id
    #[command(group(clap::ArgGroup::new("which").required(true).args(["all", "ids"])))]
    Requeue {
        /// The queue whose dead letters to requeue
        queue: String,
        /// Requeue every dead letter of the queue
        #[arg(long)]
        all: bool,
        /// The ids of the dead letters to requeue (as `queue QUEUE --dead` lists them)
        #[arg(value_name = "ID")]
        ids: Vec<u64>,
        #[command(flatten)]
        quiet: Quiet,
        #[command(flatten)]
        wait: Wait<30>,
    },
    /// Recent worker output kept by the master
    Logs {
        /// PROGRAM or PROGRAM.ID: only this program's or this worker's lines (default: all)
        target: Option<String>,
        /// How many of the most recent lines to print (default: 50; with --since, all kept)
        #[arg(short = 'n', long = "lines", value_name = "LINES")]
        lines: Option<usize>,
        /// Only lines newer than this ("10m", "1h 30m")
        #[arg(long, value_name = "DUR", value_parser = parse_duration)]
        since: Option<Duration>,
        /// Then keep printing new lines as they come, until interrupted (exit 1 when the
        /// master goes away)
        #[arg(short = 'f', long)]
        follow: bool,
        #[command(flatten)]
        wait: Wait<30>,
    },
    /// Print a shell completion script on stdout
    Completions {
        /// The shell to write the script for
        shell: clap_complete::Shell,
    },
    /// Print the man page plumule(1) on stdout, in roff (try `plumule man | man -l -`)
    Man,
    /// From inside a worker: tell plumule it is ready, or its status (like systemd-notify)
    Notify {
        /// Send READY=1: a `ready = "notify"` worker is running from now on
        #[arg(long)]
        ready: bool,
        /// Send STATUS=TEXT: a line `plumule status` shows beside the worker
        #[arg(long, value_name = "TEXT")]
        status: Option<String>,
        /// More VAR=VALUE lines to send as they are (WATCHDOG=1, STOPPING=1, …)
        #[arg(value_name = "VAR=VALUE")]
        assignments: Vec<String>,
    },
    /// Run CMD holding the named file lock (like flock(1)); 75 when the lock is not taken
    Lock {
        /// The lock's name: the file lock_dir/NAME.lock, the same one workers' `locks` take
        name: String,
        /// Take a shared (read) lock
        #[arg(long)]
        shared: bool,
        /// Give up after this long ("5s", "250ms")
        #[arg(long, value_name = "DUR", conflicts_with = "nonblock", value_parser = parse_duration)]
        timeout: Option<Duration>,
        /// Give up at once when the lock is held
        #[arg(long)]
        nonblock: bool,
        /// The cluster-wide lock of that name, through etcd (the config's `cluster`), the one
        /// workers' `{ name = NAME, cluster = true }` take
        #[arg(long, conflicts_with = "shared")]
        cluster: bool,
        /// The command to run while the lock is held, and its arguments (after `--`); its
        /// exit status is plumule's
        #[arg(last = true, required = true, value_name = "CMD")]
        cmd: Vec<OsString>,
    },
}

/// `--timeout` of a client command; `DEFAULT` seconds when not given.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct Wait<const DEFAULT: u64> {
    /// Give up (exit 1) when the master has said nothing for this long (default: 30s;
    /// `status` and `queue`: 5s). A master at work on a long request says so every second
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
}

impl<const DEFAULT: u64> Wait<DEFAULT> {
    fn limit(self) -> Option<Duration> {
        Some(self.timeout.unwrap_or(Duration::from_secs(DEFAULT)))
    }
}

/// `--no-wait` of `start`, `restart` and `scale`.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct NoWait {
    /// Return once the master has accepted the request, without waiting for the workers
    #[arg(long)]
    pub no_wait: bool,
}

/// `-q` of the commands that act.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct Quiet {
    /// Print nothing on success (errors still go to stderr)
    #[arg(short = 'q', long)]
    pub quiet: bool,
}

/// The command line as users are shown it: [`Cli`] without its hidden subcommands. The
/// completion scripts are made from it, since clap_complete lists hidden subcommands too.
pub fn shown_command() -> clap::Command {
    let full = Cli::command();
    let mut shown = clap::Command::new("plumule")
        .bin_name("plumule")
        .version(env!("CARGO_PKG_VERSION"))
        .propagate_version(true)
        .subcommand_value_name("COMMAND")
        .args(full.get_arguments().cloned())
        .subcommands(full.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
    if let Some(about) = full.get_about() {
        shown = shown.about(about.clone());
    }
    shown
}

/// A `--timeout` that is not a duration; clap shows it after the option's name.
#[derive(Debug, thiserror::Error)]
#[error("{source} (write e.g. \"5s\" or \"250ms\")")]
struct BadDuration {
    source: humantime::DurationError,
}

fn parse_duration(s: &str) -> Result<Duration, BadDuration> {
    humantime::parse_duration(s).map_err(|source| BadDuration { source })
}

/// `status --watch INTERVAL`: a duration above zero.
fn parse_interval(s: &str) -> Result<Duration, String> {
    match parse_duration(s) {
        Ok(d) if d.is_zero() => Err("the interval must be above zero (e.g. \"1s\")".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

/// The SIGNAL of `plumule signal`, checked here (a usage error) and sent by its plain name.
fn parse_signal_name(s: &str) -> Result<String, String> {
    crate::protocol::parse_signal(s).map(|sig| crate::slot::signal_name(sig).to_string())
}

/// Parses the arguments, runs the command, and returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    run(cli)
}

pub fn run(cli: Cli) -> i32 {
    match cli.command {
        Command::Run => run_master(cli.config),
        Command::Check { strict } => check(cli.config, strict),
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut shown_command(), "plumule", &mut out);
            print_all(&out)
        }
        Command::Man => {
            let mut out = Vec::new();
            match crate::manpage::render(Cli::command(), &mut out) {
                Ok(()) => print_all(&out),
                Err(e) => fail(format!("cannot render the man page: {e}")),
            }
        }
        Command::Notify {
            ready,
            status,
            assignments,
        } => match notify(ready, status, assignments) {
            Ok(()) => 0,
            Err(e) => fail(e),
        },
        Command::Lock {
            name,
            cluster: true,
            timeout,
            nonblock,
            cmd,
            ..
        } => {
            let wait = match (timeout, nonblock) {
                (_, true) => crate::locks::Wait::NonBlock,
                (Some(d), false) => crate::locks::Wait::Timeout(d),
                (None, false) => crate::locks::Wait::Block,
            };
            match cluster_settings(cli.config) {
                Ok(c) => crate::cluster::script::run(&c, &name, wait, &cmd),
                Err(e) => {
                    eprintln!("plumule lock: {e}");
                    crate::locks::EXIT_FAILURE
                }
            }
        }
        Command::Lock {
            name,
            shared,
            timeout,
            nonblock,
            cmd,
            cluster: false,
        } => {
            let lock_dir = lock_dir(cli.config);
            let mode = if shared {
                crate::locks::Mode::Shared
            } else {
                crate::locks::Mode::Exclusive
            };
            let wait = match (timeout, nonblock) {
                (_, true) => crate::locks::Wait::NonBlock,
                (Some(d), false) => crate::locks::Wait::Timeout(d),
                (None, false) => crate::locks::Wait::Block,
            };
            crate::locks::run_locked(&lock_dir, &name, mode, wait, &cmd)
        }
        Command::Status {
            program,
            json,
            watch: Some(interval),
            wait,
        } => {
            let socket = cli.socket.as_deref();
            match watch_status(socket, cli.config.as_deref(), program, json, interval, wait) {
                Ok(()) => 0,
                Err(e) => fail(e.to_string()),
            }
        }
        Command::Status {
            program,
            json,
            watch: None,
            wait,
        } => {
            let socket = cli.socket.as_deref();
            let req = Request::Status { program };
            client::run(socket, cli.config.as_deref(), wait.limit(), req, |answer| {
                let Answer::Status(status) = answer else {
                    return fail(client::ClientError::Unexpected { what: "status" }.to_string());
                };
                let text = if json {
                    match serde_json::to_string(&status) {
                        Ok(line) => line + "\n",
                        Err(e) => return fail(format!("cannot encode the status: {e}")),
                    }
                } else {
                    use std::io::IsTerminal;
                    let colour = client::colour_wanted(
                        std::io::stdout().is_terminal(),
                        std::env::var_os("NO_COLOR").as_deref(),
                    );
                    client::format_status(&status, colour)
                };
                if print_all(text.as_bytes()) != 0 {
                    return 1;
                }
                if status.any_failed() {
                    3
                } else {
                    0
                }
            })
        }
        Command::Reload { quiet, wait } => client::run(
            cli.socket.as_deref(),
            cli.config.as_deref(),
            wait.limit(),
            Request::Reload,
            |answer| {
                let Answer::Reload(reload) = answer else {
                    return fail(client::ClientError::Unexpected { what: "reload" }.to_string());
                };
                if quiet.quiet {
                    return 0;
                }
                let mut text = String::new();
                if reload.changes.is_empty() {
                    text.push_str("nothing changed\n");
                }
                for c in reload.changes {
                    text.push_str(&c);
                    text.push('\n');
                }
                print_all(text.as_bytes())
            },
        ),
        Command::Start {
            target,
            quiet,
            wait,
            no_wait,
        } => act(
            cli.socket.as_deref(),
            cli.config.as_deref(),
            Request::Start { target },
            quiet,
            wait,
            no_wait.no_wait,
        ),
        Command::Stop {
            target,
            quiet,
            wait,
        } => act(
            cli.socket.as_deref(),
            cli.config.as_deref(),
            Request::Stop { target },
            quiet,
            wait,
            false,
        ),
        Command::Restart {
            target,
            quiet,
            wait,
            no_wait,
        } => act(
            cli.socket.as_deref(),
            cli.config.as_deref(),
            Request::Restart { target },
            quiet,
            wait,
            no_wait.no_wait,
        ),
        Command::Scale {
            program,
            workers,
            quiet,
            wait,
            no_wait,
        } => act(
            cli.socket.as_deref(),
            cli.config.as_deref(),
            Request::Scale { program, workers },
            quiet,
            wait,
            no_wait.no_wait,
        ),
        Command::Signal {
            target,
            signal,
            group,
            quiet,
            wait,
        } => {
            let req = Request::Signal {
                target: target.clone(),
                signal,
                group,
            };
            client::run(
                cli.socket.as_deref(),
                cli.config.as_deref(),
                wait.limit(),
                req,
                |answer| {
                    let Answer::Signal(sent) = answer else {
                        return fail(
                            client::ClientError::Unexpected { what: "signal" }.to_string(),
                        );
                    };
                    if quiet.quiet {
                        return 0;
                    }
                    print_all(format!("{}\n", client::signal_line(&target, &sent)).as_bytes())
                },
            )
        }
        Command::Shutdown { quiet, wait } => {
            match client::shutdown(cli.socket.as_deref(), cli.config.as_deref(), wait.limit()) {
                Ok(pid) if !quiet.quiet => {
                    let pid = pid.map_or(String::new(), |p| format!(" (pid {p})"));
                    print_all(format!("master{pid}: stopped\n").as_bytes())
                }
                Ok(_) => 0,
                Err(e) => fail(e.to_string()),
            }
        }
        Command::Logs {
            target,
            lines,
            since,
            follow,
            wait,
        } => {
            // With --since, every line kept is a candidate; the master caps what it sends.
            let default_lines = if since.is_some() { usize::MAX } else { 50 };
            let req = Request::Logs {
                target,
                lines: lines.unwrap_or(default_lines),
                follow,
            };
            match logs(
                cli.socket.as_deref(),
                cli.config.as_deref(),
                &req,
                since,
                wait.limit(),
            ) {
                Ok(()) => 0,
                Err(e) => fail(e.to_string()),
            }
        }
        Command::Submit {
            queue,
            key,
            wait,
            payload,
            quiet,
            timeout,
        } => submit(
            cli.socket.as_deref(),
            cli.config.as_deref(),
            SubmitArgs {
                queue,
                key,
                wait,
                payload,
            },
            quiet,
            timeout,
        ),
        Command::Queue {
            queue,
            json,
            dead,
            wait,
        } => {
            let req = Request::Queue { queue, dead };
            client::run(
                cli.socket.as_deref(),
                cli.config.as_deref(),
                wait.limit(),
                req,
                |answer| {
                    let text = match (answer, json) {
                        (Answer::Queues(report), false) => client::queue::format_queues(&report),
                        (Answer::DeadLetters(dead), false) => client::queue::format_dead(&dead),
                        (Answer::Queues(report), true) => json_line(&report),
                        (Answer::DeadLetters(dead), true) => json_line(&dead),
                        _ => {
                            return fail(
                                client::ClientError::Unexpected { what: "queue" }.to_string(),
                            )
                        }
                    };
                    print_all(text.as_bytes())
                },
            )
        }
        Command::Members { json, wait } => client::run(
            cli.socket.as_deref(),
            cli.config.as_deref(),
            wait.limit(),
            Request::Members,
            |answer| {
                let text = match (answer, json) {
                    (Answer::Members(report), false) => format_members(&report),
                    (Answer::Members(report), true) => json_line(&report),
                    _ => {
                        return fail(
                            client::ClientError::Unexpected { what: "members" }.to_string(),
                        )
                    }
                };
                print_all(text.as_bytes())
            },
        ),
        Command::Requeue {
            queue,
            all,
            ids,
            quiet,
            wait,
        } => client::run(
            cli.socket.as_deref(),
            cli.config.as_deref(),
            wait.limit(),
            Request::Requeue { queue, ids, all },
            |answer| {
                let Answer::Requeued(done) = answer else {
                    return fail(client::ClientError::Unexpected { what: "requeue" }.to_string());
                };
                if quiet.quiet {
                    return 0;
                }
                print_all(format!("{}: {} job(s) requeued\n", done.queue, done.requeued).as_bytes())
            },
        ),
    }
}

/// One answer as one JSON line (`--json`).
fn json_line(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).map_or_else(|e| format!("{{\"error\":\"{e}\"}}"), |l| l + "\n")
}

/// What `submit` was asked for.
struct SubmitArgs {
    queue: String,
    key: Option<String>,
    wait: bool,
    payload: Vec<OsString>,
}

/// `submit`: the payloads, or stdin cut into lines, in batches over one connection; then,
/// with `--wait`, the results in submission order (exit 1 when any job ended dead).
fn submit(
    socket: Option<&Path>,
    config: Option<&Path>,
    args: SubmitArgs,
    quiet: Quiet,
    timeout: Wait<30>,
) -> i32 {
    use client::queue::{self, LineJobs, Piece, SubmitError};
    use std::os::fd::AsRawFd;
    let mut peer = match client::socket_path(socket, config)
        .and_then(|socket| queue::MasterPeer::open(&socket, timeout.limit()))
    {
        Ok(peer) => peer,
        Err(e) => return fail(e.to_string()),
    };
    let jobs: Box<dyn Iterator<Item = Result<Piece, SubmitError>>> = if args.payload.is_empty() {
        let stdin = std::io::stdin();
        let fd = stdin.as_raw_fd();
        Box::new(LineJobs::new(stdin, Some(fd), crate::protocol::MAX_REQUEST))
    } else {
        Box::new(queue::arg_jobs(args.payload))
    };
    let name = args.queue.clone();
    // Results are printed as the master streams them, in submission order.
    let mut dead = 0;
    let mut print = |chunk: &crate::protocol::JobResults| -> std::io::Result<()> {
        dead += queue::write_results(&mut std::io::stdout().lock(), chunk)?;
        Ok(())
    };
    let submitted = queue::submit(
        &mut peer,
        &args.queue,
        args.key,
        args.wait,
        jobs,
        &mut print,
    );
    let (stored, results) = match submitted {
        Ok(done) => done,
        Err(SubmitError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => return 0,
        Err(e) => return fail(e.to_string()),
    };
    let Some(results) = results else {
        if quiet.quiet {
            return 0;
        }
        return print_all(format!("{name}: {stored} job(s) submitted\n").as_bytes());
    };
    match dead {
        0 => 0,
        dead => fail(format!("{name}: {dead} of {} job(s) ended dead", results)),
    }
}

/// `start`, `stop`, `restart`, `scale`: the request, then (unless `-q`) one line saying
/// where the program or worker stands, from a status asked on the same connection.
fn act(
    socket: Option<&Path>,
    config: Option<&Path>,
    req: Request,
    quiet: Quiet,
    wait: Wait<30>,
    no_wait: bool,
) -> i32 {
    if no_wait {
        let accepted = client::socket_path(socket, config)
            .and_then(|socket| client::Connection::open(&socket, wait.limit()))
            .and_then(|mut conn| conn.request_accepted(&req));
        return match accepted {
            Ok(()) if quiet.quiet => 0,
            Ok(()) => {
                let line = match &req {
                    Request::Start { target } => format!("{target}: start requested"),
                    Request::Restart { target } => format!("{target}: restart requested"),
                    Request::Scale { program, workers } => {
                        format!("{program}: scaling to {workers} requested")
                    }
                    other => format!("{}: requested", other.describe()),
                };
                print_all(format!("{line}\n").as_bytes())
            }
            Err(e) => fail(e.to_string()),
        };
    }
    match act_on(socket, config, &req, quiet.quiet, wait.limit()) {
        Ok(line) => match line {
            Some(line) => print_all(format!("{line}\n").as_bytes()),
            None => 0,
        },
        Err(e) => fail(e),
    }
}

fn act_on(
    socket: Option<&Path>,
    config: Option<&Path>,
    req: &Request,
    quiet: bool,
    timeout: Option<Duration>,
) -> Result<Option<String>, String> {
    let text = |e: client::ClientError| e.to_string();
    let socket = client::socket_path(socket, config).map_err(text)?;
    let mut conn = client::Connection::open(&socket, timeout).map_err(text)?;
    conn.ask(req).map_err(text)?;
    let target = match req {
        Request::Start { target } | Request::Stop { target } | Request::Restart { target } => {
            Target::parse(target).map_err(|e| e.to_string())?
        }
        Request::Scale { program, .. } => Target {
            program: program.clone(),
            id: None,
        },
        _ => return Ok(None),
    };
    let starts = matches!(req, Request::Start { .. } | Request::Restart { .. });
    if quiet && !starts {
        return Ok(None);
    }
    if let Request::Stop { .. } = req {
        return Ok(Some(format!("{}: stopped", req_target_name(&target))));
    }
    let status = Request::Status {
        program: Some(target.program.clone()),
    };
    let Answer::Status(report) = conn.ask(&status).map_err(text)? else {
        return Err(text(client::ClientError::Unexpected { what: "status" }));
    };
    let none = report.workers().all(|(p, _)| p.name != target.program);
    if starts && target.id.is_none() && none {
        // The request succeeded, yet nothing runs: say so rather than a silent success.
        return Err(format!(
            "{0}: 0 workers wanted; nothing to start (`plumule scale {0} N` sets how many)",
            target.program
        ));
    }
    Ok((!quiet).then(|| client::summary_line(&target, &report)))
}

/// `web` or `web.2`.
fn req_target_name(t: &Target) -> String {
    match t.id {
        Some(id) => format!("{}.{id}", t.program),
        None => t.program.clone(),
    }
}

/// `logs`, and `logs -f`: the silence bound holds until the first answer, then the stream
/// may be quiet for as long as the workers are; its end means the master went away.
fn logs(
    socket: Option<&Path>,
    config: Option<&Path>,
    req: &Request,
    since: Option<Duration>,
    timeout: Option<Duration>,
) -> Result<(), client::ClientError> {
    let socket = client::socket_path(socket, config)?;
    let mut conn = client::Connection::open(&socket, timeout)?;
    let follow = matches!(req, Request::Logs { follow: true, .. });
    conn.send(req)?;
    let mut first = true;
    loop {
        let response = match conn.read_response()? {
            Some(r) => r,
            None if first => return Err(client::ClientError::NoAnswer),
            None => return Err(client::ClientError::Gone),
        };
        let mut logs = match response {
            Response::Ok(Answer::Logs(logs)) => logs,
            Response::Ok(_) => return Err(client::ClientError::Unexpected { what: "logs" }),
            Response::Error(e) => return Err(client::ClientError::Refused(e)),
        };
        client::logs_since(&mut logs, since, std::time::SystemTime::now());
        if !client::print_log_lines(&logs) || !follow {
            return Ok(());
        }
        if first {
            conn.unbounded()?;
            first = false;
        }
    }
}

/// `status --watch`: the status every `interval` over one connection (a new one when the
/// master has closed it, idle), printed in place on a terminal, one after the other
/// otherwise. Ends when stdout goes away (Ok) or the master does ([`client::ClientError::Gone`]).
fn watch_status(
    socket: Option<&Path>,
    config: Option<&Path>,
    program: Option<String>,
    json: bool,
    interval: Duration,
    wait: Wait<5>,
) -> Result<(), client::ClientError> {
    use std::io::{IsTerminal, Write};
    let socket = client::socket_path(socket, config)?;
    let terminal = std::io::stdout().is_terminal();
    let colour = client::colour_wanted(terminal, std::env::var_os("NO_COLOR").as_deref());
    let req = Request::Status { program };
    let mut conn = client::Connection::open(&socket, wait.limit())?;
    let mut first = true;
    loop {
        let answer = match conn.ask(&req) {
            Ok(answer) => answer,
            // The master's refusal ("no program named web") and its silence stand as they are.
            Err(e @ (client::ClientError::Refused(_) | client::ClientError::Silent { .. })) => {
                return Err(e)
            }
            Err(e) if first => return Err(e),
            // Closed: by a master that went away, or by one that closes idle connections.
            Err(_) => {
                conn = client::Connection::open(&socket, wait.limit())
                    .map_err(|_| client::ClientError::Gone)?;
                match conn.ask(&req) {
                    Ok(answer) => answer,
                    Err(e @ client::ClientError::Refused(_)) => return Err(e),
                    // Silent too: a stopping master takes no new connection.
                    Err(_) => return Err(client::ClientError::Gone),
                }
            }
        };
        let Answer::Status(status) = answer else {
            return Err(client::ClientError::Unexpected { what: "status" });
        };
        let text = client::watch_frame(&status, json, terminal, colour, first);
        let mut out = std::io::stdout().lock();
        let written = out.write_all(text.as_bytes()).and_then(|()| out.flush());
        match written {
            Ok(()) => {}
            // `plumule status --watch | head`: the reader is done, and so is the watch.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(client::ClientError::Stdout(e)),
        }
        drop(out);
        first = false;
        // The refresh interval the user asked for: the client's own pace, not a wait for
        // the master (which is asked again at once after it).
        std::thread::sleep(interval);
    }
}

/// Writes to stdout; a reader that went away (`plumule man | head`) is not an error.
fn print_all(bytes: &[u8]) -> i32 {
    use std::io::Write;
    match std::io::stdout().lock().write_all(bytes) {
        Ok(()) => 0,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => 0,
        Err(e) => fail(format!("cannot write to stdout: {e}")),
    }
}

fn fail(message: String) -> i32 {
    eprintln!("plumule: {message}");
    1
}

fn load(cli_path: Option<PathBuf>) -> Result<config::Config, i32> {
    let path = config::find_config_path(cli_path.as_deref());
    config::load(&path).map_err(|e| fail(format!("invalid config:\n{e}")))
}

fn run_master(cli_path: Option<PathBuf>) -> i32 {
    let config = match load(cli_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    crate::logging::init(config.log_level);
    let master = match crate::master::Master::new(config) {
        Ok(m) => m,
        Err(e) => {
            log::error!("{e}");
            return e.exit_code();
        }
    };
    let code = match master.run() {
        Ok(()) => 0,
        Err(e) => {
            log::error!("{e}");
            e.exit_code()
        }
    };
    // Lines a slow reader of stderr has not taken yet get a last chance.
    crate::logging::finish(std::time::Duration::from_secs(1));
    code
}

/// `plumule notify`: one datagram of `VAR=VALUE` lines to `$NOTIFY_SOCKET`, the socket plumule
/// (or systemd) gave the worker. Sent from a child of the worker, it still counts for the
/// worker: plumule attributes a message to the sender's process group too.
fn notify(ready: bool, status: Option<String>, assignments: Vec<String>) -> Result<(), String> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let mut lines: Vec<String> = Vec::new();
    if ready {
        lines.push("READY=1".into());
    }
    if let Some(s) = status {
        lines.push(format!("STATUS={}", s.replace('\n', " ")));
    }
    for a in assignments {
        if !a.contains('=') || a.contains('\n') {
            return Err(format!("`{a}` is not a VAR=VALUE line"));
        }
        lines.push(a);
    }
    if lines.is_empty() {
        return Err("nothing to send: give --ready, --status or VAR=VALUE".into());
    }
    let path = std::env::var_os("NOTIFY_SOCKET")
        .ok_or("NOTIFY_SOCKET is not set: run it from a worker plumule or systemd started")?;
    let text = path.to_string_lossy().into_owned();
    let addr = match text.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(&text),
    }
    .map_err(|e| format!("NOTIFY_SOCKET={text}: {e}"))?;
    let sock = UnixDatagram::unbound().map_err(|e| e.to_string())?;
    sock.send_to_addr(lines.join("\n").as_bytes(), &addr)
        .map_err(|e| format!("cannot send to NOTIFY_SOCKET={text}: {e}"))?;
    Ok(())
}

/// `plumule check`: errors exit 1; warnings are printed and exit 1 only with `--strict`.
fn check(cli_path: Option<PathBuf>, strict: bool) -> i32 {
    let path = config::find_config_path(cli_path.as_deref());
    let resolve = |name: &str, path_var: &std::ffi::OsStr, cwd: Option<&std::path::Path>| {
        crate::launch::resolve(name, path_var, cwd)
            .map(drop)
            .map_err(|e| e.to_string())
    };
    let probe = config::Probe {
        euid: nix::unistd::geteuid().as_raw(),
        egid: nix::unistd::getegid().as_raw(),
        inherited_path: std::env::var_os("PATH"),
        default_path: crate::launch::DEFAULT_PATH.as_ref(),
        resolve: &resolve,
    };
    let (config, warnings) = match config::load_for_check(&path, &probe) {
        Ok(checked) => checked,
        Err(e) => return fail(format!("invalid config:\n{e}")),
    };
    let code = print_all(describe(&config).as_bytes());
    if warnings.is_empty() {
        return code;
    }
    eprintln!("{warnings}");
    if strict {
        let n = warnings.problems.len();
        let s = if n == 1 { "" } else { "s" };
        return fail(format!("{n} warning{s}, refused with --strict"));
    }
    code
}

/// The resolved config, as `check` prints it.
pub fn describe(config: &config::Config) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "config      {}", config.path.display());
    let _ = writeln!(out, "runtime_dir {}", config.runtime_dir.display());
    let _ = writeln!(out, "state_dir   {}", config.state_dir.display());
    let _ = writeln!(out, "lock_dir    {}", config.lock_dir.display());
    if let Some(cluster) = &config.cluster {
        let etcd: Vec<String> = cluster
            .etcd
            .iter()
            .map(|u| crate::cluster::etcd::redact(u))
            .collect();
        let _ = writeln!(
            out,
            "cluster     node={} etcd={} lease={}",
            config.node,
            etcd.join(","),
            crate::format_duration(cluster.lease)
        );
    }
    let _ = writeln!(out, "programs    {}", config.programs.len());
    for p in &config.programs {
        let command = match &p.command {
            config::CommandSpec::Argv(argv) => format!("{argv:?}"),
            config::CommandSpec::Shell(line) => format!("/bin/sh -c {line:?}"),
            config::CommandSpec::Function(_) => "(a Rust function)".to_string(),
        };
        let restart = match p.restart {
            config::RestartPolicy::Always => "always",
            config::RestartPolicy::OnFailure => "on-failure",
            config::RestartPolicy::Never => "never",
        };
        let _ = writeln!(
            out,
            "  {:<16} workers={} restart={} stop={}/{} {}",
            p.name,
            p.workers,
            restart,
            crate::slot::signal_name(p.stop_signal),
            crate::format_duration(p.stop_timeout),
            command
        );
    }
    let _ = writeln!(out, "queues      {}", config.queues.len());
    for q in &config.queues {
        let protocol = match q.protocol {
            config::QueueProtocol::Lines => "lines",
            config::QueueProtocol::Frames => "frames",
        };
        let route = match q.route {
            config::Route::LeastLoaded => "least-loaded",
            config::Route::RoundRobin => "round-robin",
            config::Route::Key => "key",
        };
        let consumer = config
            .programs
            .iter()
            .find(|p| p.queue.as_deref() == Some(q.name.as_str()))
            .map_or("no consumer here".to_string(), |p| {
                format!("consumed by {}", p.name)
            });
        let backend = match &q.backend {
            Some(url) => {
                let partitions = if q.route == config::Route::Key && config.cluster.is_some() {
                    format!(" partitions={}", q.partitions)
                } else {
                    String::new()
                };
                format!(
                    " backend={} claim_after={}{partitions}",
                    crate::queue::redis::redact(url),
                    crate::format_duration(q.claim_after)
                )
            }
            None => String::new(),
        };
        let _ = writeln!(
            out,
            "  {:<16} durable={} protocol={protocol} prefetch={} max_attempts={} route={route} \
             max_pending={}{backend} {consumer}",
            q.name, q.durable, q.prefetch, q.max_attempts, q.max_pending
        );
    }
    out
}

/// The cluster `plumule lock --cluster` joins: the config file's `cluster`.
fn cluster_settings(cli_path: Option<PathBuf>) -> Result<config::Cluster, String> {
    let path = config::find_config_path(cli_path.as_deref());
    let c = config::load(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    c.cluster.ok_or_else(|| {
        format!(
            "{} has no cluster (set [plumule] cluster = {{ etcd = [...] }})",
            path.display()
        )
    })
}

/// `plumule members` as a table: one line per master.
fn format_members(report: &crate::protocol::MembersReport) -> String {
    let mut rows = vec![[
        "NODE".to_string(),
        "HOST".into(),
        "PID".into(),
        "SINCE".into(),
        "PROGRAMS".into(),
    ]];
    for m in &report.members {
        rows.push([
            m.node.clone(),
            m.host.clone(),
            m.pid.to_string(),
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(m.since))
                .to_string(),
            m.programs.join(","),
        ]);
    }
    client::queue::table(&rows)
}

/// Where `plumule lock` finds lock files: the config's `lock_dir` when a config file is
/// found and valid, else the default for this user (so it works with no master and no file).
fn lock_dir(cli_path: Option<PathBuf>) -> PathBuf {
    let path = config::find_config_path(cli_path.as_deref());
    if path.exists() {
        match config::load(&path) {
            Ok(c) => return c.lock_dir,
            Err(e) => eprintln!("plumule: ignoring invalid config {}: {e}", path.display()),
        }
    }
    // No file: the defaults of an empty config are this user's.
    match config::parse(
        "",
        &std::env::current_dir()
            .unwrap_or_default()
            .join("plumule.toml"),
    ) {
        Ok(c) => c.lock_dir,
        Err(_) => PathBuf::from("/run/plumule/locks"),
    }
}
