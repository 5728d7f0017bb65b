//! The store suite against a real PostgreSQL server started by the test
//! (initdb + postgres on a free port). In CI a missing PostgreSQL is a
//! failure; `.ci/run` installs it.

mod suite;

use std::sync::Arc;

use berth_store::{PostgresStore, Store};
use berth_testkit::{require_or_skip, PgServer};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// One cluster for the whole file, one database per case, stopped at the
/// end (a static would never be dropped, leaving the server behind).
#[test]
fn store_suite_on_postgres() {
    if !require_or_skip(PgServer::available(), "PostgreSQL server binaries (apt-get install postgresql)") {
        return;
    }
    let pg = PgServer::start().unwrap();
    let rt = runtime();
    rt.block_on(async {
        macro_rules! case {
            ($name:ident) => {{
                let store = PostgresStore::open(&pg.database(stringify!($name))).await.unwrap();
                suite::$name(&store).await;
            }};
        }
        case!(stale_plans_cannot_overcommit);
        case!(ports_are_unique_and_stale_servers_refused);
        case!(syncs_are_fenced_by_epoch_and_sequence);
        case!(report_changes_are_conditional_on_generation);
        case!(a_sync_confirms_many_servers_at_once);
        case!(names_and_transitions);
        case!(leadership_is_exclusive_and_fences_commits);
        case!(events_filter_and_page);
        case!(operations_follow_the_guard_table);
        case!(kill_is_ordered_until_the_instance_is_gone);
        case!(a_stopping_server_is_billed_until_the_stop_is_confirmed);
        case!(failing_and_restart_bookkeeping);
        case!(webhooks_fan_out_retry_and_disable);
        case!(a_start_is_placed_in_its_own_write_when_it_fits);
        let store: Arc<dyn Store> = Arc::new(PostgresStore::open(&pg.database("concurrent")).await.unwrap());
        suite::concurrent_commits_never_exceed_a_node(store).await;
        let store: Arc<dyn Store> = Arc::new(PostgresStore::open(&pg.database("burst")).await.unwrap());
        suite::a_burst_of_writes_is_answered_write_by_write(store).await;

        // Two stores on one database are two replicas: committing
        // concurrently through both still never over-commits.
        let url = pg.database("replicas");
        let a: Arc<dyn Store> = Arc::new(PostgresStore::open(&url).await.unwrap());
        let b: Arc<dyn Store> = Arc::new(PostgresStore::open(&url).await.unwrap());
        suite::two_replicas_committing_never_overcommit(a, b).await;

        // Reopening finds the rows (L6) and a second open does not migrate twice.
        let url = pg.database("reopen");
        {
            let store = PostgresStore::open(&url).await.unwrap();
            suite::stale_plans_cannot_overcommit(&store).await;
        }
        let store = PostgresStore::open(&url).await.unwrap();
        assert_eq!(store.node_usage().await.unwrap()[0].reserved, berth_core::MemMib(2048));
    });
}
