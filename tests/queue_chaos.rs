//! Chaos for durable queues (issue 9, SPEC §4): jobs streamed in by several `plumule submit`
//! runs, consumed by `while read` shell workers that a killer thread SIGKILLs at random every
//! few tens of milliseconds (now and then the master's syncer process instead), while the
//! master itself is SIGKILLed and restarted twice (same
//! config, same state_dir). Afterwards every job whose `submit` returned success was answered
//! at least once (its line is in the results file, written by the worker before it answers
//! `ok`) or is a dead letter with a reason; none is lost, and none appears that nobody
//! submitted. The test prints the duplicates (jobs run more than once), the dead letters and
//! the time it took.
//!
//! Size: 20 000 jobs; `PLUMULE_SOAK=1` (set by the soak run of issue 14) makes it 200 000.
//! The master gets 64 KiB segments (the hidden `PLUMULE_QUEUE_SEGMENT_SIZE`), so that moves to
//! a new segment and compactions happen all through the run, kills included.

mod common;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use plumule::protocol::{Answer, DeadLetters, QueueCounts, QueueReport, Request, Response};

/// Jobs submitted in a normal run, and under `PLUMULE_SOAK=1`.
const JOBS: usize = 20_000;
const SOAK_JOBS: usize = 200_000;
/// How many `plumule submit` runs share the jobs.
const RUNS: usize = 8;
/// Attempts before a job is dead-lettered: a job is hit by a kill only when it is in flight
/// at the worker killed, so kills alone rarely reach this.
const MAX_ATTEMPTS: u32 = 25;
/// The master's segment size: small, see the module docs.
const SEGMENT_SIZE: &str = "65536";

fn soak() -> bool {
    std::env::var("PLUMULE_SOAK").is_ok_and(|v| v == "1")
}

/// A small xorshift generator: the chaos only needs to be irregular, and the seed is printed
/// so that a failing run's pattern can be looked at again.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One request over the control socket, every read and write bounded; `None` when no master
/// answers (none listens, it died mid-answer, or the answer does not parse): the master is
/// SIGKILLed at times here, so silence is expected and not a failure.
fn ask(socket: &Path, req: &Request) -> Option<Response> {
    let stream = UnixStream::connect(socket).ok()?;
    let bound = Some(Duration::from_secs(5));
    stream.set_read_timeout(bound).ok()?;
    stream.set_write_timeout(bound).ok()?;
    let mut line = serde_json::to_vec(req).ok()?;
    line.push(b'\n');
    (&stream).write_all(&line).ok()?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).ok()?;
    serde_json::from_str(&answer).ok()
}

/// The counts of queue `q`, if a master answers.
fn counts(socket: &Path) -> Option<QueueCounts> {
    let req = Request::Queue {
        queue: Some("q".into()),
        dead: false,
    };
    match ask(socket, &req)? {
        Response::Ok(Answer::Queues(QueueReport { queues })) => {
            queues.into_iter().find(|q| q.name == "q")
        }
        _ => None,
    }
}

/// Pids of the running workers of program `w`, if a master answers.
fn worker_pids(socket: &Path) -> Vec<i32> {
    match ask(socket, &Request::Status { program: None }) {
        Some(Response::Ok(Answer::Status(report))) => running(&report, "w").into_values().collect(),
        _ => Vec::new(),
    }
}

/// What the submitter thread did.
#[derive(Default)]
struct Submitted {
    /// Payloads of the runs whose `submit` exited 0: they must all come back.
    stored: Vec<String>,
    /// Payloads of runs that failed (the master died under them): some may have been stored
    /// and run, none has to.
    maybe: Vec<String>,
    failed_runs: usize,
}

/// The payloads of one attempt at run `run`: `r{run}.{attempt}-{i}`, unique in the test.
fn payloads(run: usize, attempt: usize, per_run: usize) -> Vec<String> {
    (0..per_run)
        .map(|i| format!("r{run}.{attempt}-{i}"))
        .collect()
}

/// Submits `RUNS` runs of `per_run` jobs one after the other, each streamed through
/// `plumule submit q` from a file on stdin. A run that fails (the master was killed during
/// it) is done again with fresh payloads once a master answers.
fn submit_all(
    sb: &Sandbox,
    config: &Path,
    per_run: usize,
    runs_started: &AtomicUsize,
    stop: &AtomicBool,
    deadline: Duration,
) -> Submitted {
    let mut out = Submitted::default();
    let socket = sb.control_socket();
    for run in 0..RUNS {
        for attempt in 0.. {
            if stop.load(Ordering::SeqCst) {
                return out; // the test is failing elsewhere
            }
            sb.wait("a master answers before a submit run", DEADLINE, || {
                counts(&socket).is_some()
            });
            let jobs = payloads(run, attempt, per_run);
            let input = sb.write_file(
                &format!("jobs-{run}.{attempt}"),
                &jobs.iter().map(|j| format!("{j}\n")).collect::<String>(),
                0o644,
            );
            if attempt == 0 {
                runs_started.fetch_add(1, Ordering::SeqCst);
            }
            let args = ["submit", "q", "-c", &config.display().to_string()];
            let mut d = sb.spawn_plumule_with(&args, |cmd| {
                cmd.stdin(fs::File::open(&input).expect("open the jobs file"));
            });
            let status = d.wait_exit(deadline);
            if status.success() {
                out.stored.extend(jobs);
                break;
            }
            println!(
                "submit run {run}.{attempt} failed ({status}): {}",
                d.stderr_text().trim()
            );
            out.failed_runs += 1;
            out.maybe.extend(jobs);
            assert!(attempt < 5, "submit run {run} failed {} times", attempt + 1);
        }
    }
    out
}

/// SIGKILLs a random running worker every 5 to 40 ms until `stop`, and one time in ten the
/// master's syncer process (`plumule-syncer`) instead; returns how many workers and syncers
/// it killed. A pid is only killed while its parent is the current master (`master`), so a
/// recycled pid is never hit.
fn killer(socket: &Path, master: &AtomicI32, stop: &AtomicBool, seed: u64) -> (usize, usize) {
    let mut rng = Rng(seed);
    let (mut workers, mut syncers) = (0, 0);
    while !stop.load(Ordering::SeqCst) {
        // The pace of the chaos, not a synchronisation: nothing waits on these kills.
        std::thread::sleep(Duration::from_millis(5 + rng.below(35))); // the killer's own pace
        let parent = master.load(Ordering::SeqCst);
        let child_of_master =
            |pid: i32| proc_stat(pid).is_some_and(|p| p.ppid == parent && p.state != 'Z');
        let sigkill = |pid: i32| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), SIGKILL);
        if rng.below(10) == 0 {
            let syncer = live_children(parent)
                .into_iter()
                .find(|p| p.comm == "plumule-syncer");
            if let Some(p) = syncer {
                if child_of_master(p.pid) && sigkill(p.pid).is_ok() {
                    syncers += 1;
                }
            }
            continue;
        }
        let pids = worker_pids(socket);
        if pids.is_empty() {
            continue;
        }
        let pid = pids[rng.below(pids.len() as u64) as usize];
        if child_of_master(pid) && sigkill(pid).is_ok() {
            workers += 1;
        }
    }
    (workers, syncers)
}

/// Sets its flag when dropped, so that a panic in the test's main thread stops the threads
/// it started instead of leaving `thread::scope` waiting for them.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Reads the results file: payload → how many times a worker ran it.
fn results(path: &Path) -> HashMap<String, usize> {
    let text = fs::read_to_string(path).unwrap_or_default();
    let mut seen = HashMap::new();
    for line in text.lines() {
        let (payload, pid) = line
            .split_once(' ')
            .unwrap_or_else(|| panic!("malformed results line {line:?}"));
        assert!(
            pid.parse::<i32>().is_ok(),
            "malformed results line {line:?}"
        );
        *seen.entry(payload.to_string()).or_insert(0) += 1;
    }
    seen
}

fn config(sb: &Sandbox, results: &Path) -> PathBuf {
    // The worker writes the job's line to the results file (one write, O_APPEND) before it
    // answers, so a job acknowledged as done is always in the file.
    let worker = sb.script(
        "worker.sh",
        &format!(
            "exec 3>>{}\nwhile read -r job; do\n  echo \"$job $$\" >&3\n  echo ok\ndone",
            sh_str(results)
        ),
    );
    sb.config(&format!(
        "[program.w]\ncommand = {}\nworkers = 3\nqueue = \"q\"\nhealthy_after = \"50ms\"\n\
         backoff = {{ initial = \"5ms\", max = \"40ms\" }}\nstop_timeout = \"2s\"\n\n\
         [queue.q]\nprefetch = 4\nmax_attempts = {MAX_ATTEMPTS}\n\
         retry_backoff = {{ initial = \"5ms\", max = \"20ms\" }}\n",
        argv(&worker)
    ))
}

#[test]
fn durable_jobs_survive_killed_workers_and_two_killed_masters() {
    let total = if soak() { SOAK_JOBS } else { JOBS };
    let per_run = total / RUNS;
    // Generous bounds that scale with the size; the normal run takes far less.
    let budget = Duration::from_secs(if soak() { 1200 } else { 180 });
    let sb = Sandbox::with_budget(budget);
    let results_path = sb.path("results");
    let config = config(&sb, &results_path);
    let socket = sb.control_socket();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    println!("chaos: {total} jobs in {RUNS} submit runs, killer seed {seed}");
    let started = Instant::now();

    let mut master = sb.start_with_env(&config, &[("PLUMULE_QUEUE_SEGMENT_SIZE", SEGMENT_SIZE)]);
    let master_pid = AtomicI32::new(master.pid());
    wait_running(&sb, "w", 3);

    let stop = AtomicBool::new(false);
    let runs_started = AtomicUsize::new(0);
    let restarts = Mutex::new(Vec::new());
    let (submitted, (kills, syncer_kills)) = std::thread::scope(|s| {
        let killer = s.spawn(|| killer(&socket, &master_pid, &stop, seed));
        let submitter = s.spawn(|| submit_all(&sb, &config, per_run, &runs_started, &stop, budget));
        let _stop_on_panic = StopOnDrop(&stop);

        // First master kill: in the middle of a submit run (a third into run RUNS/2 - 1, as
        // far as the master's counts of what it holds and did tell).
        let first_at = (RUNS / 2 - 1) * per_run + per_run / 3;
        sb.wait("a third of a submit run mid-way is stored", budget, || {
            let held =
                counts(&socket).map_or(0, |c| c.pending + c.in_flight + c.done + c.dead) as usize;
            (runs_started.load(Ordering::SeqCst) >= RUNS / 2 && held >= first_at)
                || submitter.is_finished()
        });
        // Second: once a good part of the jobs ran (the results file's size tells, roughly:
        // a line is the payload, a space, a pid and a newline).
        let line_len = format!("r0.0-{} 12345\n", per_run / 2).len() as u64;
        let second_at = total as u64 * line_len * 6 / 10;
        for (i, when) in ["mid-submit", "mid-processing"].into_iter().enumerate() {
            if i == 1 {
                sb.wait("60% of the jobs have run", budget, || {
                    fs::metadata(&results_path).is_ok_and(|m| m.len() >= second_at)
                        || (submitter.is_finished()
                            && counts(&socket).is_some_and(|c| c.pending + c.in_flight == 0))
                });
            }
            let before = counts(&socket);
            master.stop_with(SIGKILL, DEADLINE);
            restarts.lock().unwrap().push(format!("{when}: {before:?}"));
            master = sb.start_with_env(&config, &[("PLUMULE_QUEUE_SEGMENT_SIZE", SEGMENT_SIZE)]);
            master_pid.store(master.pid(), Ordering::SeqCst);
            sb.wait("the restarted master answers", DEADLINE, || {
                counts(&socket).is_some()
            });
        }
        let submitted = submitter.join().expect("the submitter thread");
        stop.store(true, Ordering::SeqCst);
        let kills = killer.join().expect("the killer thread");
        (submitted, kills)
    });
    for r in restarts.lock().unwrap().iter() {
        println!("master SIGKILLed {r}");
    }
    assert_eq!(submitted.stored.len(), total, "every run was submitted");

    // Without the killer the workers drain what is left.
    sb.wait("queue q is drained", budget, || {
        counts(&socket).is_some_and(|c| c.pending == 0 && c.in_flight == 0)
    });
    let out = sb.cli_ok(&config, &["queue", "q", "--json"]);
    let report: QueueReport = serde_json::from_str(&out.stdout).expect("queue --json");
    assert_eq!(report.queues.len(), 1, "{}", out.stdout);
    assert_eq!(report.queues[0].pending, 0, "{}", out.stdout);
    assert_eq!(report.queues[0].in_flight, 0, "{}", out.stdout);
    let out = sb.cli_ok(&config, &["queue", "q", "--dead", "--json"]);
    let dead: DeadLetters = serde_json::from_str(&out.stdout).expect("queue --dead --json");
    let elapsed = started.elapsed();

    let ran = results(&results_path);
    let stored: HashSet<&str> = submitted.stored.iter().map(String::as_str).collect();
    let maybe: HashSet<&str> = submitted.maybe.iter().map(String::as_str).collect();
    let mut dead_payloads = HashSet::new();
    for d in &dead.dead {
        assert!(
            !d.reason.is_empty(),
            "a dead letter without a reason: {d:?}"
        );
        assert!(
            stored.contains(d.payload.as_str()) || maybe.contains(d.payload.as_str()),
            "a dead letter nobody submitted: {d:?}"
        );
        dead_payloads.insert(d.payload.as_str());
    }
    let invented: Vec<&String> = ran
        .keys()
        .filter(|p| !stored.contains(p.as_str()) && !maybe.contains(p.as_str()))
        .take(10)
        .collect();
    assert!(
        invented.is_empty(),
        "jobs ran that nobody submitted: {invented:?}"
    );
    let lost: Vec<&str> = submitted
        .stored
        .iter()
        .map(String::as_str)
        .filter(|p| !ran.contains_key(*p) && !dead_payloads.contains(p))
        .collect();
    assert!(
        lost.is_empty(),
        "{} submitted job(s) neither answered nor dead, e.g. {:?}; master stderr:\n{}",
        lost.len(),
        &lost[..lost.len().min(10)],
        master.stderr_text()
    );

    let duplicates: usize = ran.values().map(|n| n - 1).sum();
    let stored_dead = dead_payloads.iter().filter(|p| stored.contains(*p)).count();
    let dead_unanswered = dead_payloads
        .iter()
        .filter(|p| stored.contains(*p) && !ran.contains_key(**p))
        .count();
    let from_failed_runs = ran.keys().filter(|p| maybe.contains(p.as_str())).count();
    println!(
        "chaos: {total} jobs stored by {RUNS} submit runs ({} failed run(s) redone, {} of \
         their {} jobs ran anyway); {kills} workers and {syncer_kills} syncers SIGKILLed, the master twice; {} distinct \
         jobs answered, {duplicates} duplicate answers; {stored_dead} of the stored jobs dead \
         ({} of them never answered; {} dead letters in all) with max_attempts \
         {MAX_ATTEMPTS}; {:.1} s",
        submitted.failed_runs,
        from_failed_runs,
        submitted.maybe.len(),
        ran.len(),
        dead_unanswered,
        dead.dead.len(),
        elapsed.as_secs_f64()
    );
    stop_cleanly(&mut master);
}
