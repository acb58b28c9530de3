//! `plumule logs` shows the supervisor's own events about a worker (started, exited and what
//! follows, stopped) among the worker's output, in order, and `logs -f` streams them (SPEC §1).

mod common;

use common::*;

/// The text after `SOURCE: ` of each line `plumule logs` printed (`TIME SOURCE: TEXT`).
fn texts(stdout: &str, source: &str) -> Vec<String> {
    let tag = format!(" {source}: ");
    stdout
        .lines()
        .map(|l| match l.split_once(&tag) {
            Some((_, text)) => text.to_string(),
            None => panic!("not a line of {source}: {l:?}"),
        })
        .collect()
}

#[test]
fn logs_shows_start_exit_and_restart_in_order_among_the_output() {
    let sb = Sandbox::new();
    let marker = sb.path("crashed");
    let script = sb.worker(
        "web.sh",
        &format!(
            "if [ -e {m} ]; then echo 'second run'; exec sleep 1000; fi\n\
             : > {m}\necho 'first run'\nexit 3",
            m = sh_str(&marker)
        ),
    );
    let config = sb.config(&format!(
        "[program.web]\ncommand = {}\n\
         backoff = {{ initial = \"1ms\", max = \"1ms\", jitter = 0.0 }}\n",
        argv(&script)
    ));
    let master = sb.start(&config);
    master.wait_stderr(&["web.0: second run"], DEADLINE);
    let starts = sb.starts_of("web");
    assert_eq!(starts.len(), 2, "{starts:?}");

    let out = sb.cli_ok(&config, &["logs", "web"]);
    assert_eq!(
        texts(&out.stdout, "web.0"),
        [
            format!("plumule: started (pid {})", starts[0].pid),
            "first run".to_string(),
            "plumule: exited (exit 3); restarting in 1ms".to_string(),
            format!("plumule: started (pid {})", starts[1].pid),
            "second run".to_string(),
        ],
        "{}",
        out.stdout
    );
    // The events belong to the worker: a filter on another worker leaves them out.
    let other = sb.cli_ok(&config, &["logs", "web.1"]);
    assert_eq!(other.stdout, "", "{}", other.stdout);
    // The master's own log says the same, tagged with the worker.
    master.wait_stderr(&["web.0: exited (exit 3); restarting in 1ms"], DEADLINE);
}

#[test]
fn logs_follow_streams_a_new_event() {
    let sb = Sandbox::new();
    let script = sb.worker("web.sh", "echo hello\nexec sleep 1000");
    let config = sb.config(&format!("[program.web]\ncommand = {}\n", argv(&script)));
    let master = sb.start(&config);
    master.wait_stderr(&["web.0: hello"], DEADLINE);
    let c = config.display().to_string();

    let follower = sb.spawn_plumule(&["logs", "-f", "web", "-c", &c]);
    sb.wait("logs -f printed the worker's line", DEADLINE, || {
        follower.stdout_text().contains("web.0: hello")
    });
    assert!(
        !follower.stdout_text().contains("stopped"),
        "{}",
        follower.stdout_text()
    );
    sb.cli_ok(&config, &["stop", "web"]);
    sb.wait("logs -f printed the stop", DEADLINE, || {
        follower
            .stdout_text()
            .contains("web.0: plumule: stopped (signal TERM)")
    });
    let text = follower.stdout_text();
    let sending = text.find("web.0: plumule: stopping: sending TERM");
    let stopped = text.find("web.0: plumule: stopped (signal TERM)");
    assert!(
        sending.is_some() && sending < stopped,
        "the stop signal is told before the end: {text}"
    );
}
