//! The RabbitMQ tutorials' Python programs (pika), unchanged, against `petrel serve`:
//! the programs in `tests/python/tutorials/` are run as a user runs them, and their output
//! is checked as the tutorials describe it.
//!
//! As published today, tutorials 1, 2 and 6 declare their queues (`hello`, `task_queue`,
//! `rpc_queue`) durable with `x-queue-type: quorum`. Each test starts its own broker, so
//! the tutorials' fixed queue and exchange names do not collide.

use std::time::Duration;

use anyhow::{Context, ensure};
use petrel_tests::amqp::TestBroker;
use petrel_tests::python::{Script, wait_until};

/// Generous for a debug build and Python on two busy cores; every wait ends on a condition.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Tutorial 2's workers sleep a second per '.' of a task: 15 seconds of work in all.
const WORK_TIMEOUT: Duration = Duration::from_secs(60);

/// A fresh `petrel serve`, or the broker `PETREL_TEST_AMQP_PORT` names.
fn broker() -> anyhow::Result<TestBroker> {
    TestBroker::start(TIMEOUT)
}

/// The lines of `text` that are exactly `line`.
fn count_lines(text: &str, line: &str) -> usize {
    text.lines().filter(|l| *l == line).count()
}

/// The lines that start with " [x]": what a log receiver printed of its messages.
fn received(script: &Script) -> Vec<String> {
    script
        .stdout()
        .lines()
        .filter(|line| line.starts_with(" [x]"))
        .map(str::to_owned)
        .collect()
}

/// Tutorial 1, "Hello World!": send.py puts one message on queue `hello`, receive.py
/// consumes it (auto-ack).
#[test]
fn tutorial_1_hello_world() -> anyhow::Result<()> {
    let broker = broker()?;
    let receiver = Script::tutorial("receive.py", &[], broker.port)?;
    // Printed once its consumer is registered.
    receiver.wait_for_output(" [*] Waiting for messages. To exit press CTRL+C", TIMEOUT)?;

    let sent = Script::run_tutorial("send.py", &[], broker.port, TIMEOUT)?;
    ensure!(sent.stdout.contains(" [x] Sent 'Hello World!'"), "{sent:?}");
    receiver.wait_for_output(" [x] Received Hello World!", TIMEOUT)?;
    Ok(())
}

/// Tutorial 2, "Work Queues": new_task.py publishes persistent tasks to the durable
/// queue `task_queue`; two worker.py (prefetch 1, manual ack) share them, each task
/// done by exactly one worker.
#[test]
fn tutorial_2_work_queues() -> anyhow::Result<()> {
    let broker = broker()?;
    let workers = [
        Script::tutorial("worker.py", &[], broker.port)?,
        Script::tutorial("worker.py", &[], broker.port)?,
    ];
    for worker in &workers {
        // Printed after queue.declare, just before basic.qos and basic.consume.
        worker.wait_for_output(" [*] Waiting for messages. To exit press CTRL+C", TIMEOUT)?;
    }

    // The tutorial's own tasks: a worker sleeps one second per dot.
    let tasks = [
        "First message.",
        "Second message..",
        "Third message...",
        "Fourth message....",
        "Fifth message.....",
    ];
    for task in tasks {
        let args: Vec<&str> = task.split(' ').collect();
        let sent = Script::run_tutorial("new_task.py", &args, broker.port, TIMEOUT)?;
        ensure!(
            sent.stdout.contains(&format!(" [x] Sent {task}")),
            "{sent:?}"
        );
    }

    let [first, second] = &workers;
    let received = |out: &str| -> Vec<String> {
        out.lines()
            .filter_map(|line| line.strip_prefix(" [x] Received "))
            .map(str::to_owned)
            .collect()
    };
    // Done: every task received, and each worker as often done as it received one.
    let all_done = || {
        let outputs = [first.stdout(), second.stdout()];
        tasks.iter().all(|task| {
            outputs
                .iter()
                .any(|out| received(out).iter().any(|r| r == task))
        }) && outputs
            .iter()
            .all(|out| received(out).len() == count_lines(out, " [x] Done"))
    };
    wait_until(
        "every task is done",
        WORK_TIMEOUT,
        &[first, second],
        all_done,
    )?;

    let outputs = [first.stdout(), second.stdout()];
    let describe = || format!("{}\n{}", first.describe(), second.describe());
    let mut all_received: Vec<String> = outputs.iter().flat_map(|out| received(out)).collect();
    all_received.sort();
    let mut sent: Vec<String> = tasks.iter().map(|task| (*task).to_owned()).collect();
    sent.sort();
    // Each task exactly once, and nothing else (a broker shared by
    // PETREL_TEST_AMQP_PORT may hold leftovers of a failed run).
    ensure!(
        all_received == sent,
        "the workers received {all_received:?}, not each task once\n{}",
        describe()
    );
    // Fair dispatch: with prefetch 1 a busy worker gets no second task, so the other one
    // (consuming within milliseconds of its banner) gets some of the 15 s of work.
    for out in &outputs {
        ensure!(
            !received(out).is_empty(),
            "one worker did all the work\n{}",
            describe()
        );
    }
    Ok(())
}

/// Tutorial 3, "Publish/Subscribe": emit_log.py publishes to the fanout exchange `logs`;
/// every receive_logs.py (a server-named exclusive queue bound to it) gets every message.
#[test]
fn tutorial_3_publish_subscribe() -> anyhow::Result<()> {
    let broker = broker()?;
    let receivers = [
        Script::tutorial("receive_logs.py", &[], broker.port)?,
        Script::tutorial("receive_logs.py", &[], broker.port)?,
    ];
    for receiver in &receivers {
        // Printed once its queue is bound: later messages reach it.
        receiver.wait_for_output(" [*] Waiting for logs. To exit press CTRL+C", TIMEOUT)?;
    }

    let sent = Script::run_tutorial("emit_log.py", &[], broker.port, TIMEOUT)?;
    ensure!(
        sent.stdout.contains(" [x] Sent info: Hello World!"),
        "{sent:?}"
    );
    let sent = Script::run_tutorial(
        "emit_log.py",
        &["warning:", "Run.", "Run.", "Or", "it", "will", "explode."],
        broker.port,
        TIMEOUT,
    )?;
    ensure!(
        sent.stdout
            .contains(" [x] Sent warning: Run. Run. Or it will explode."),
        "{sent:?}"
    );

    for receiver in &receivers {
        receiver.wait_for_output(" [x] warning: Run. Run. Or it will explode.", TIMEOUT)?;
        ensure!(
            received(receiver)
                == [
                    " [x] info: Hello World!",
                    " [x] warning: Run. Run. Or it will explode."
                ],
            "{}",
            receiver.describe()
        );
    }
    Ok(())
}

/// Tutorial 4, "Routing": emit_log_direct.py publishes to the direct exchange
/// `direct_logs` with the severity as routing key; each receive_logs_direct.py gets the
/// severities it bound.
#[test]
fn tutorial_4_routing() -> anyhow::Result<()> {
    let broker = broker()?;
    // The tutorial's two receivers: problems only (to a file), and everything (on screen).
    let problems = Script::tutorial("receive_logs_direct.py", &["warning", "error"], broker.port)?;
    let all = Script::tutorial(
        "receive_logs_direct.py",
        &["info", "warning", "error"],
        broker.port,
    )?;
    for receiver in [&problems, &all] {
        receiver.wait_for_output(" [*] Waiting for logs. To exit press CTRL+C", TIMEOUT)?;
    }

    let logs: [&[&str]; 3] = [
        &["error", "Run.", "Run.", "Or", "it", "will", "explode."],
        &["info", "All", "is", "well."],
        &["warning", "Last", "one."],
    ];
    for args in logs {
        let sent = Script::run_tutorial("emit_log_direct.py", args, broker.port, TIMEOUT)?;
        let line = format!(" [x] Sent {}:{}", args[0], args[1..].join(" "));
        ensure!(sent.stdout.contains(&line), "no {line:?} in {sent:?}");
    }

    // The last message reaches both, after the ones published before it.
    for receiver in [&problems, &all] {
        receiver.wait_for_output(" [x] warning:Last one.", TIMEOUT)?;
    }
    ensure!(
        received(&problems)
            == [
                " [x] error:Run. Run. Or it will explode.",
                " [x] warning:Last one."
            ],
        "{}",
        problems.describe()
    );
    ensure!(
        received(&all)
            == [
                " [x] error:Run. Run. Or it will explode.",
                " [x] info:All is well.",
                " [x] warning:Last one."
            ],
        "{}",
        all.describe()
    );
    Ok(())
}

/// Tutorial 5, "Topics": emit_log_topic.py publishes to the topic exchange `topic_logs`;
/// each receive_logs_topic.py gets what matches its binding keys (`*` one word, `#` any).
#[test]
fn tutorial_5_topics() -> anyhow::Result<()> {
    let broker = broker()?;
    let everything = Script::tutorial("receive_logs_topic.py", &["#"], broker.port)?;
    let kern = Script::tutorial("receive_logs_topic.py", &["kern.*"], broker.port)?;
    let critical = Script::tutorial("receive_logs_topic.py", &["*.critical"], broker.port)?;
    let both = Script::tutorial(
        "receive_logs_topic.py",
        &["kern.*", "*.critical"],
        broker.port,
    )?;
    let receivers = [&everything, &kern, &critical, &both];
    for receiver in receivers {
        receiver.wait_for_output(" [*] Waiting for logs. To exit press CTRL+C", TIMEOUT)?;
    }

    let logs: [&[&str]; 5] = [
        &["kern.critical", "A", "critical", "kernel", "error"],
        &["kern.info", "A", "kernel", "note"],
        &["app.critical", "An", "app", "is", "down"],
        // No arguments: the tutorial's default key and message, anonymous.info.
        &[],
        &["kern.critical", "The", "last", "one"],
    ];
    for args in logs {
        let sent = Script::run_tutorial("emit_log_topic.py", args, broker.port, TIMEOUT)?;
        ensure!(sent.stdout.contains(" [x] Sent "), "{sent:?}");
    }

    // The last message matches every binding, and comes after the others.
    for receiver in receivers {
        receiver.wait_for_output(" [x] kern.critical:The last one", TIMEOUT)?;
    }
    let critical_error = " [x] kern.critical:A critical kernel error";
    let kernel_note = " [x] kern.info:A kernel note";
    let app_down = " [x] app.critical:An app is down";
    let anonymous = " [x] anonymous.info:Hello World!";
    let last = " [x] kern.critical:The last one";
    let expected: [(&Script, Vec<&str>); 4] = [
        (
            &everything,
            vec![critical_error, kernel_note, app_down, anonymous, last],
        ),
        (&kern, vec![critical_error, kernel_note, last]),
        (&critical, vec![critical_error, app_down, last]),
        // Matching both bindings, kern.critical is still delivered once.
        (&both, vec![critical_error, kernel_note, app_down, last]),
    ];
    for (receiver, lines) in expected {
        ensure!(received(receiver) == lines, "{}", receiver.describe());
    }
    Ok(())
}

/// Tutorial 6, "RPC": rpc_client.py sends a request to `rpc_queue` with `reply_to` (its
/// exclusive, server-named queue) and a `correlation_id`; rpc_server.py (prefetch 1)
/// publishes the answer there through the default exchange.
#[test]
fn tutorial_6_rpc() -> anyhow::Result<()> {
    let broker = broker()?;
    let server = Script::tutorial("rpc_server.py", &[], broker.port)?;
    // Printed once its consumer is registered.
    server.wait_for_output(" [x] Awaiting RPC requests", TIMEOUT)?;

    let client = Script::run_tutorial("rpc_client.py", &[], broker.port, TIMEOUT)?;
    ensure!(
        client.stdout == " [x] Requesting fib(30)\n [.] Got 832040\n",
        "{client:?}"
    );
    server.wait_for_output(" [.] fib(30)", TIMEOUT)?;
    Ok(())
}

/// The README's AMQP examples, copied out of README.md and run as written, each
/// printing what it shows.
#[test]
fn the_readme_examples_run() -> anyhow::Result<()> {
    let readme = include_str!("../../README.md");
    let section = readme
        .find("## AMQP 0-9-1")
        .context("the README has its AMQP section")?;
    let section = &readme[section..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |e| e + 3)];
    let examples: Vec<&str> = section
        .split("```python\n")
        .skip(1)
        .filter_map(|block| block.split("```").next())
        .collect();
    let expected = ["b'Hello World!'", "b'event 2'"];
    ensure!(
        examples.len() == expected.len(),
        "{} Python examples in the AMQP section",
        examples.len()
    );
    let broker = broker()?;
    let dir = tempfile::tempdir()?;
    for (i, (example, shows)) in examples.iter().zip(expected).enumerate() {
        let path = dir.path().join(format!("readme_example_{i}.py"));
        std::fs::write(&path, example)?;
        let ran = Script::start(&path, &[], broker.port)?.wait_success(TIMEOUT)?;
        ensure!(ran.stdout.contains(shows), "example {i}: {ran:?}");
    }
    Ok(())
}
