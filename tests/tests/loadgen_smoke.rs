#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Smoke test of `tessera-loadgen`: every mode runs with tiny sizes against a real in-process
//! server (and agent) and prints its figure lines, each with a limit measured in the same run.
//! No timing is asserted: this checks the benchmark still works, not how fast Tessera is.

use std::process::Stdio;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(300);

/// Runs the load generator with `args`; returns its stdout after checking it succeeded.
async fn loadgen(args: &[&str]) -> String {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tessera-loadgen"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let output = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("tessera-loadgen {args:?} did not finish in {DEADLINE:?}"))
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "tessera-loadgen {args:?} failed: {}\n{stdout}\n{stderr}", output.status);
    assert!(stdout.starts_with("MACHINE cpus="), "{stdout}");
    stdout
}

/// The `FIGURE` line named `name`, parsed into its fields.
fn figure(stdout: &str, name: &str) -> std::collections::HashMap<String, String> {
    let line = stdout
        .lines()
        .find(|line| line.starts_with(&format!("FIGURE name={name} ")))
        .unwrap_or_else(|| panic!("no figure {name} in:\n{stdout}"));
    line.split_whitespace().skip(1).filter_map(|f| f.split_once('=')).map(|(k, v)| (k.into(), v.into())).collect()
}

fn number(fields: &std::collections::HashMap<String, String>, key: &str) -> f64 {
    fields[key].parse().unwrap_or_else(|_| panic!("{key} is not a number: {fields:?}"))
}

/// A throughput figure: a positive rate, a positive limit from the same run, their ratio.
fn assert_throughput(stdout: &str, name: &str) {
    let fields = figure(stdout, name);
    let (value, limit, ratio) = (number(&fields, "value"), number(&fields, "limit"), number(&fields, "ratio"));
    assert!(value > 0.0 && limit > 0.0, "{fields:?}");
    assert!((ratio - value / limit).abs() < 0.01, "{fields:?}");
    // A figure with a target says whether it met it; one without (`target=-`) says `met=-`.
    let met_ok =
        if fields["target"] == "-" { fields["met"] == "-" } else { fields["met"] == "yes" || fields["met"] == "NO" };
    assert!(met_ok, "{fields:?}");
}

#[tokio::test]
async fn x509_mode_prints_the_rate_beside_the_signing_limit() {
    let out = loadgen(&["x509", "--agents", "2", "--entries", "3", "--seconds", "0.5", "--probe-seconds", "0.2"]).await;
    assert_throughput(&out, "x509.svids_per_sec");
    assert_eq!(number(&figure(&out, "x509.item_failures"), "value"), 0.0, "{out}");
    figure(&out, "x509.batch_p99_ms");
}

#[tokio::test]
async fn jwt_mode_prints_the_rate_beside_the_mint_limit() {
    let out = loadgen(&["jwt", "--agents", "2", "--entries", "2", "--seconds", "0.5", "--probe-seconds", "0.2"]).await;
    assert_throughput(&out, "jwt.svids_per_sec");
    assert_eq!(number(&figure(&out, "jwt.failures"), "value"), 0.0, "{out}");
    assert_throughput(&out, "jwt.unary_svids_per_sec");
    assert_eq!(number(&figure(&out, "jwt.unary_failures"), "value"), 0.0, "{out}");
}

#[tokio::test]
async fn propagation_mode_delivers_every_entry() {
    let out = loadgen(&["propagation", "--entries", "3"]).await;
    assert_eq!(number(&figure(&out, "propagation.failures"), "value"), 0.0, "{out}");
    let p99 = figure(&out, "propagation.p99_ms");
    assert!(number(&p99, "value") > 0.0, "{p99:?}");
    assert_eq!(p99["target"], "value<500");
}

#[tokio::test]
async fn workload_mode_measures_each_level_beside_the_floor() {
    let out = loadgen(&["workload", "--clients", "1,4", "--calls", "8", "--min-calls-per-client", "2"]).await;
    for level in ["c1", "c4"] {
        for api in ["x509", "jwt"] {
            let p50 = figure(&out, &format!("workload.{level}.{api}_p50_us"));
            assert!(number(&p50, "value") > 0.0 && number(&p50, "limit") > 0.0, "{p50:?}");
            assert_eq!(number(&figure(&out, &format!("workload.{level}.{api}_failures")), "value"), 0.0, "{out}");
        }
    }
}

#[tokio::test]
async fn bad_options_are_refused_with_a_one_line_error() {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_tessera-loadgen"))
        .args(["x509", "--entries", "501"])
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.starts_with("tessera-loadgen: error: ") && stderr.contains("--entries"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[tokio::test]
async fn scale_mode_syncs_every_entry_after_a_restart() {
    let out = loadgen(&["scale", "--sizes", "40", "--writers", "4"]).await;
    assert_eq!(number(&figure(&out, "scale.n40.sync_missing_entries"), "value"), 0.0, "{out}");
    assert_eq!(number(&figure(&out, "scale.n40.sync_failures"), "value"), 0.0, "{out}");
    let writes = figure(&out, "scale.n40.entry_writes_per_sec");
    assert!(number(&writes, "value") > 0.0 && number(&writes, "limit") > 0.0, "{writes:?}");
    assert!(number(&figure(&out, "scale.n40.startup_ms"), "value") > 0.0, "{out}");
    // The restart is the real server binary on the written data: a process with its own RSS.
    assert!(number(&figure(&out, "scale.n0.rss_bytes"), "value") > 1_000_000.0, "{out}");
    assert!(number(&figure(&out, "scale.n40.disk_bytes_per_entry"), "value") > 0.0, "{out}");
    for name in ["startup_rss_bytes_per_entry", "synced_rss_bytes_per_entry"] {
        assert!(number(&figure(&out, &format!("scale.n40.{name}")), "value") >= 0.0, "{out}");
    }
}

#[tokio::test]
async fn workload_open_loop_measures_each_level_beside_the_floor_under_the_same_load() {
    let out = loadgen(&["workload", "--clients", "1,4", "--rate", "200", "--seconds", "0.3"]).await;
    for level in ["c1", "c4"] {
        let tag = format!("workload.open.{level}");
        assert_eq!(number(&figure(&out, &format!("{tag}.offered_rate")), "value"), 200.0, "{out}");
        assert!(number(&figure(&out, &format!("{tag}.floor_p50_us")), "value") > 0.0, "{out}");
        for api in ["x509", "jwt"] {
            let p99 = figure(&out, &format!("{tag}.{api}_p99_us"));
            assert!(number(&p99, "value") > 0.0 && number(&p99, "limit") > 0.0, "{p99:?}");
            assert!(number(&figure(&out, &format!("{tag}.{api}_rate")), "value") > 0.0, "{out}");
            assert_eq!(number(&figure(&out, &format!("{tag}.{api}_failures")), "value"), 0.0, "{out}");
        }
    }
}

#[tokio::test]
async fn rotation_mode_renews_every_svid_with_and_without_jitter() {
    let out = loadgen(&["rotation", "--agents", "2", "--entries", "3", "--ttl", "12", "--probe-seconds", "0.2"]).await;
    for run in ["jitter_off", "jitter_on"] {
        let tag = format!("rotation.{run}");
        assert_eq!(number(&figure(&out, &format!("{tag}.svids_renewed")), "value"), 6.0, "{out}");
        assert_eq!(number(&figure(&out, &format!("{tag}.failures")), "value"), 0.0, "{out}");
        assert_throughput(&out, &format!("{tag}.peak_svids_per_sec"));
        figure(&out, &format!("{tag}.server_cpu_us_per_svid"));
    }
}

/// Needs the real agent binary next to the load generator (`cargo test --workspace` builds it).
#[tokio::test]
async fn agent_memory_mode_counts_every_minted_svid() {
    let out = loadgen(&["agent-memory", "--sizes", "10", "--timeout", "120"]).await;
    let per_svid = figure(&out, "agent_memory.n10.rss_bytes_per_svid");
    // The limit is leaf DER + key DER of a served SVID: a few hundred bytes at least.
    assert!(number(&per_svid, "limit") > 300.0, "{per_svid:?}");
    assert!(number(&figure(&out, "agent_memory.n10.rss_after_bytes"), "value") > 0.0, "{out}");
}

#[tokio::test]
async fn fleet_mode_attests_and_syncs_every_agent_from_worker_processes() {
    let out = loadgen(&["fleet", "--agents", "4", "--entries", "2", "--workers", "2", "--concurrency", "2"]).await;
    assert_eq!(number(&figure(&out, "fleet.n4.failures"), "value"), 0.0, "{out}");
    assert_eq!(number(&figure(&out, "fleet.n4.missing_entries"), "value"), 0.0, "{out}");
    assert!(number(&figure(&out, "fleet.n4.overload_retries"), "value") >= 0.0, "{out}");
    assert_throughput(&out, "fleet.n4.agents_per_sec");
    assert!(number(&figure(&out, "fleet.n4.server_cpu_ms_per_agent"), "value") >= 0.0, "{out}");
}

#[tokio::test]
async fn mint_scale_mode_mints_every_entry_and_measures_both_sides() {
    let out =
        loadgen(&["mint-scale", "--sizes", "20", "--writers", "2", "--rate-limit", "0", "--timeout", "120"]).await;
    assert!(number(&figure(&out, "mint_scale.n20.all_minted_s"), "value") > 0.0, "{out}");
    // Both sides did work, measured apart on their own runtimes.
    assert!(number(&figure(&out, "mint_scale.n20.server_cpu_per_entry_us"), "value") > 0.0, "{out}");
    assert!(number(&figure(&out, "mint_scale.n20.agent_cpu_per_entry_us"), "value") > 0.0, "{out}");
    let last = figure(&out, "mint_scale.n20.cpu_per_entry_last_tenth_us");
    assert_eq!(last["limit_name"], "cpu_per_entry_first_tenth_us", "{out}");
}

#[tokio::test]
async fn wl_throughput_mode_fetches_on_new_connections_beside_the_limit() {
    let out = loadgen(&["wl-throughput", "--clients", "2,4", "--seconds", "0.3", "--probe-seconds", "0.1"]).await;
    for level in ["c2", "c4"] {
        let tag = format!("wl_throughput.{level}");
        assert_throughput(&out, &format!("{tag}.fetches_per_agent_cpu_sec"));
        assert_eq!(
            figure(&out, &format!("{tag}.fetches_per_agent_cpu_sec"))["limit_name"],
            "1/(L_attest+L_newconn/2)_cpu"
        );
        assert!(number(&figure(&out, &format!("{tag}.fetches_per_sec")), "value") > 0.0, "{out}");
        assert_eq!(number(&figure(&out, &format!("{tag}.failures")), "value"), 0.0, "{out}");
    }
    assert!(number(&figure(&out, "wl_throughput.limit_newconn_us"), "value") > 0.0, "{out}");
}

#[tokio::test]
async fn stream_hygiene_mode_cancels_every_stream_on_one_connection() {
    let out = loadgen(&["stream-hygiene", "--streams", "50"]).await;
    assert_eq!(number(&figure(&out, "stream_hygiene.streams"), "value"), 50.0, "{out}");
    assert_eq!(number(&figure(&out, "stream_hygiene.failures"), "value"), 0.0, "{out}");
    assert_eq!(number(&figure(&out, "stream_hygiene.reconnects"), "value"), 0.0, "{out}");
    for name in ["stream_hygiene.p50_us", "stream_hygiene.p99_us"] {
        let latency = figure(&out, name);
        assert!(number(&latency, "value") > 0.0 && number(&latency, "limit") > 0.0, "{latency:?}");
    }
}

#[tokio::test]
async fn rotation_storm_mode_mints_every_svid_due_at_once() {
    let out = loadgen(&[
        "rotation-storm",
        "--svids",
        "20",
        "--subscribers",
        "3",
        "--writers",
        "2",
        "--probe-seconds",
        "0.1",
        "--timeout",
        "120",
    ])
    .await;
    let wall = figure(&out, "rotation_storm.n20.wall_ms");
    assert!(number(&wall, "value") > 0.0 && number(&wall, "limit") > 0.0, "{wall:?}");
    assert_eq!(wall["target"], "ratio<=1.50", "{wall:?}");
    // Every subscriber got its SVID, minted in the storm.
    assert_eq!(number(&figure(&out, "rotation_storm.n20.subscribers"), "value"), 3.0, "{out}");
    assert!(number(&figure(&out, "rotation_storm.n20.server_cpu_us_per_svid"), "value") > 0.0, "{out}");
}
