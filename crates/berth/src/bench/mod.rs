//! `berth bench SCENARIO`: measures berth against a real control plane
//! (child process, SQLite with every answered write fsynced, HTTP on loopback) and
//! simulated nodes (the real agent with the `sim` driver). Each scenario
//! prints a table of what it measured and, with `--json`, one JSON object
//! as its last line. Scenarios report figures; they do not judge them
//! against targets (BENCHMARKS.md does), except that every one counts
//! invariant violations, which must be 0.

mod admission;
mod churn;
mod detection;
pub mod harness;
mod memory;
mod recovery;

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::Value;

#[derive(Subcommand)]
pub enum Scenario {
    /// Placements per second and admission latency under a burst of starts,
    /// with group commit and through the naive one-transaction-per-write path
    Admission(admission::AdmissionArgs),
    /// Time for a control plane killed with -9 to answer with the right
    /// reservations again, and for every agent to re-sync
    Recovery(recovery::RecoveryArgs),
    /// Time to declare a killed node lost, and billing error against the real death
    Detection(detection::DetectionArgs),
    /// Control-plane resident memory per server
    Memory(memory::MemoryArgs),
    /// Sustained starts and stops: latency under load
    Churn(churn::ChurnArgs),
}

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    scenario: Scenario,
    /// Also print one JSON object as the last line
    #[arg(long, global = true)]
    json: bool,
    /// Keep the scenario's data dirs (control-plane log and database) here
    #[arg(long, global = true)]
    keep: Option<std::path::PathBuf>,
}

pub async fn run(args: BenchArgs) -> Result<()> {
    let tmp = tempfile::Builder::new().prefix("berth-bench-").tempdir()?;
    let dir = match &args.keep {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => tmp.path().to_path_buf(),
    };
    let report = match args.scenario {
        Scenario::Admission(a) => admission::run(a, &dir).await?,
        Scenario::Recovery(a) => recovery::run(a, &dir).await?,
        Scenario::Detection(a) => detection::run(a, &dir).await?,
        Scenario::Memory(a) => memory::run(a, &dir).await?,
        Scenario::Churn(a) => churn::run(a, &dir).await?,
    };
    print!("{}", report.table());
    if args.json {
        println!("{}", serde_json::to_string(&report.json)?);
    }
    Ok(())
}

/// What a scenario measured: rows for people, one object for scripts.
pub struct Report {
    pub title: String,
    pub rows: Vec<(String, String)>,
    pub json: Value,
}

impl Report {
    fn table(&self) -> String {
        let rows: Vec<Vec<String>> = self.rows.iter().map(|(k, v)| vec![k.clone(), v.clone()]).collect();
        format!("{}\n{}", self.title, crate::output::table(&["MEASURE", "VALUE"], &rows))
    }
}
