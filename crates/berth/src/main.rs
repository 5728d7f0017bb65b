//! The `berth` command: runs the control plane, the agent, or both (`dev`),
//! and talks to a control plane as a client (`server`, `node`, `token`,
//! `events`), and measures it (`bench`). It wires the libraries together and owns process concerns:
//! flags, logging, signals, files in the data dir. Decisions live in the
//! libraries, not here.

mod bench;
mod cli;
mod daemon;
mod fakegame;
mod output;

use clap::Parser;

// glibc's allocator spent about a tenth of the control plane's CPU under a
// start burst (malloc_consolidate, heap growth and trimming); mimalloc's
// per-thread pages keep the many short-lived buffers of requests and
// rows off that path. Built without transparent huge pages (`no_thp`):
// with them every fresh or purged 2 MiB region was zeroed whole on its
// first touch, 10.5 % of the machine's CPU in the burst (clear_page_erms
// under mimalloc's page allocation), in the bench's process and here.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    if let cli::Cmd::Fakegame(a) = cli.cmd {
        // The workload is plain threads: no runtime, no logging setup.
        return match fakegame::run(a.into()) {
            Ok(code) => std::process::ExitCode::from(code as u8),
            Err(e) => {
                eprintln!("fakegame: {e}");
                std::process::ExitCode::from(1)
            }
        };
    }
    if let cli::Cmd::Watchdog { dir, agent_pid } = &cli.cmd {
        // Plain threads too: the watchdog must keep working when the agent
        // is paused, so it shares nothing with it.
        return match berth_agent::watchdog::run(dir, *agent_pid) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("watchdog: {e}");
                std::process::ExitCode::from(1)
            }
        };
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
