//! The `plumule` command line (clap): the master (`run`), config checking, the client
//! commands that talk to a running master, and `plumule lock`.
//!
//! Exit codes: 0 ok, 1 error (message on stderr), 2 usage, 3 another master owns the
//! runtime dir (or, for `status`, a worker is `failed`).

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};

use crate::client;
use crate::config;
use crate::protocol::{Answer, Request, Response};

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

/// The commands. Those marked `hide` parse (so they can say "not supported yet") but are not
/// built: `--help`, the man page and the completion scripts leave them out.
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
    },
    /// Re-read the config file and apply what changed (like SIGHUP)
    Reload,
    /// Start a program or one worker (PROGRAM.ID); clears `failed`
    Start {
        /// PROGRAM or PROGRAM.ID: a whole program, or one worker by its id (from 0)
        target: String,
    },
    /// Stop a program or one worker (PROGRAM.ID)
    Stop {
        /// PROGRAM or PROGRAM.ID: a whole program, or one worker by its id (from 0)
        target: String,
    },
    /// Restart a program or one worker (PROGRAM.ID)
    Restart {
        /// PROGRAM or PROGRAM.ID: a whole program, or one worker by its id (from 0)
        target: String,
    },
    /// Change the number of workers of a program at run time
    Scale {
        /// The program to scale
        program: String,
        /// How many workers it runs from now on (until the file's `workers` for it changes)
        #[arg(value_name = "N")]
        workers: u32,
    },
    /// Enqueue jobs (not built yet: job queues)
    #[command(hide = true)]
    Submit {
        /// The queue to add the jobs to
        queue: String,
        /// The routing key of the jobs
        #[arg(long)]
        key: Option<String>,
        /// Wait for the jobs' results and print them
        #[arg(long)]
        wait: bool,
        /// The jobs, one per argument (none: one job per line of stdin)
        payload: Vec<String>,
    },
    /// Queue counters (not built yet: job queues)
    #[command(hide = true)]
    Queue {
        /// Only this queue
        queue: Option<String>,
        /// Machine-readable output
        #[arg(long)]
        json: bool,
        /// List the dead letters with their reasons
        #[arg(long)]
        dead: bool,
    },
    /// Put dead letters back in the queue (not built yet: job queues)
    #[command(hide = true)]
    Requeue {
        /// The queue whose dead letters to requeue
        queue: String,
        /// Requeue every dead letter of the queue
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        /// The dead letters to requeue
        ids: Vec<String>,
    },
    /// Recent worker output kept by the master
    Logs {
        /// PROGRAM or PROGRAM.ID: only this program's or this worker's lines (default: all)
        target: Option<String>,
        /// How many of the most recent lines to print
        #[arg(
            short = 'n',
            long = "lines",
            value_name = "LINES",
            default_value_t = 50
        )]
        lines: usize,
        /// Then keep printing new lines as they come, until interrupted (exit 1 when the
        /// master goes away)
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// Print a shell completion script on stdout
    Completions {
        /// The shell to write the script for
        shell: clap_complete::Shell,
    },
    /// Print the man page plumule(1) on stdout, in roff (try `plumule man | man -l -`)
    Man,
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
        /// The command to run while the lock is held, and its arguments (after `--`); its
        /// exit status is plumule's
        #[arg(last = true, required = true, value_name = "CMD")]
        cmd: Vec<OsString>,
    },
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
        Command::Lock {
            name,
            shared,
            timeout,
            nonblock,
            cmd,
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
        Command::Status { program, json } => {
            let socket = cli.socket.as_deref();
            let req = Request::Status { program };
            client::run(socket, cli.config.as_deref(), req, |answer| {
                let Answer::Status(status) = answer else {
                    return fail(client::ClientError::Unexpected { what: "status" }.to_string());
                };
                let text = if json {
                    match serde_json::to_string(&status) {
                        Ok(line) => line + "\n",
                        Err(e) => return fail(format!("cannot encode the status: {e}")),
                    }
                } else {
                    client::format_status(&status)
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
        Command::Reload => client::run(
            cli.socket.as_deref(),
            cli.config.as_deref(),
            Request::Reload,
            |answer| {
                let Answer::Reload(reload) = answer else {
                    return fail(client::ClientError::Unexpected { what: "reload" }.to_string());
                };
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
        Command::Start { target } => simple(&cli.socket, &cli.config, Request::Start { target }),
        Command::Stop { target } => simple(&cli.socket, &cli.config, Request::Stop { target }),
        Command::Restart { target } => {
            simple(&cli.socket, &cli.config, Request::Restart { target })
        }
        Command::Scale { program, workers } => simple(
            &cli.socket,
            &cli.config,
            Request::Scale { program, workers },
        ),
        Command::Logs {
            target,
            lines,
            follow,
        } => {
            let req = Request::Logs {
                target,
                lines,
                follow,
            };
            if !follow {
                return client::run(
                    cli.socket.as_deref(),
                    cli.config.as_deref(),
                    req,
                    |answer| match answer {
                        Answer::Logs(logs) => {
                            let _ = client::print_log_lines(&logs);
                            0
                        }
                        _ => fail(client::ClientError::Unexpected { what: "logs" }.to_string()),
                    },
                );
            }
            let socket = match client::socket_path(cli.socket.as_deref(), cli.config.as_deref()) {
                Ok(s) => s,
                Err(e) => return fail(e.to_string()),
            };
            let mut code = 0;
            let streamed = client::stream_answers(&socket, &req, |r| match r {
                Response::Ok(Answer::Logs(logs)) => client::print_log_lines(&logs),
                Response::Ok(_) => {
                    code = fail(client::ClientError::Unexpected { what: "logs" }.to_string());
                    false
                }
                Response::Error(e) => {
                    code = fail(e);
                    false
                }
            });
            match streamed {
                Ok(()) => code,
                Err(e) => fail(e.to_string()),
            }
        }
        other => fail(format!("`{}` is not supported yet", command_name(&other))),
    }
}

/// A request whose success prints nothing.
fn simple(socket: &Option<PathBuf>, config: &Option<PathBuf>, req: Request) -> i32 {
    client::run(socket.as_deref(), config.as_deref(), req, |_| 0)
}

fn command_name(c: &Command) -> &'static str {
    match c {
        Command::Submit { .. } => "submit",
        Command::Queue { .. } => "queue",
        Command::Requeue { .. } => "requeue",
        _ => "this command",
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
    match master.run() {
        Ok(()) => 0,
        Err(e) => {
            log::error!("{e}");
            e.exit_code()
        }
    }
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
    let _ = writeln!(out, "programs    {}", config.programs.len());
    for p in &config.programs {
        let command = match &p.command {
            config::CommandSpec::Argv(argv) => format!("{argv:?}"),
            config::CommandSpec::Shell(line) => format!("/bin/sh -c {line:?}"),
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
        let _ = writeln!(
            out,
            "  {:<16} protocol={:?} prefetch={} max_attempts={} route={:?}",
            q.name, q.protocol, q.prefetch, q.max_attempts, q.route
        );
    }
    out
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
