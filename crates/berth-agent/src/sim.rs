//! The `sim` driver: instances that exist only in memory, for benchmarks
//! and simulations of large fleets in one process.
//!
//! A simulated instance becomes ready after a configurable start latency,
//! uses a configurable share of its reservation, may fail to start or
//! crash at configurable rates, and stops after a configurable delay. The
//! node itself is simulated too: its host memory is what the agent was
//! told, minus what its instances use, and its ports are free unless one of
//! its instances holds them, so hundreds of simulated nodes can share one
//! machine without their preflights seeing each other. Randomness comes
//! from a seeded generator, so a run can be repeated. Like every driver it
//! decides nothing; it must never touch the host (no processes, no files,
//! no sockets).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use berth_api::HostStats;
use berth_core::template::InstanceSpec;
use berth_core::{LastExit, ServerId};

use crate::driver::{Driver, DriverError, Key, Observed};

/// How simulated instances behave.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// The simulated host's memory (MiB).
    pub host_total_mib: u64,
    /// Start latency, uniform in `[min, max]` milliseconds.
    pub start_latency_ms: (u64, u64),
    /// Share of its reservation a running instance uses, from 0 to 1.
    pub memory_use: f64,
    /// Probability that a start fails with a transient error.
    pub start_failure_rate: f64,
    /// Mean crashes per instance-hour of running (exponential).
    pub crashes_per_hour: f64,
    /// How long a graceful stop takes (milliseconds).
    pub stop_latency_ms: u64,
    pub seed: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            host_total_mib: 16 * 1024,
            start_latency_ms: (200, 800),
            memory_use: 0.8,
            start_failure_rate: 0.0,
            crashes_per_hour: 0.0,
            stop_latency_ms: 200,
            seed: 1,
        }
    }
}

impl SimConfig {
    /// Checks the settings at the edge (rates and shares in range).
    pub fn validate(&self) -> Result<(), String> {
        let share = |x: f64| (0.0..=1.0).contains(&x);
        if !share(self.memory_use) {
            return Err(format!("memory use must be from 0 to 1, got {}", self.memory_use));
        }
        if !share(self.start_failure_rate) {
            return Err(format!("start failure rate must be from 0 to 1, got {}", self.start_failure_rate));
        }
        if !(self.crashes_per_hour >= 0.0 && self.crashes_per_hour.is_finite()) {
            return Err(format!("crashes per hour must be a non-negative number, got {}", self.crashes_per_hour));
        }
        if self.start_latency_ms.0 > self.start_latency_ms.1 {
            return Err(format!("start latency range {}-{} is empty", self.start_latency_ms.0, self.start_latency_ms.1));
        }
        Ok(())
    }
}

/// SplitMix64: small, seedable, good enough for simulated chance.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo + 1)
    }
}

#[derive(Debug, Clone)]
struct SimInstance {
    spec: InstanceSpec,
    ready_at: Instant,
    /// When it crashes on its own, if it does.
    crash_at: Option<Instant>,
    stop_at: Option<Instant>,
    exited: Option<LastExit>,
}

impl SimInstance {
    /// Moves the instance along its simulated life up to `now`.
    fn advance(&mut self, now: Instant) {
        if self.exited.is_some() {
            return;
        }
        if self.stop_at.is_some_and(|t| now >= t) {
            self.exited = Some(LastExit { reason: "stopped".into(), code: Some(0) });
        } else if self.crash_at.is_some_and(|t| now >= t) {
            self.exited = Some(LastExit { reason: "exited".into(), code: Some(1) });
        }
    }

    fn used_mib(&self, share: f64, now: Instant) -> u64 {
        if self.exited.is_some() {
            return 0;
        }
        // Still starting: half of what it will use.
        let full = (self.spec.memory_mib.0 as f64 * share) as u64;
        if now < self.ready_at {
            full / 2
        } else {
            full
        }
    }
}

pub struct SimDriver {
    cfg: SimConfig,
    rng: Mutex<Rng>,
    instances: Mutex<HashMap<Key, SimInstance>>,
}

impl SimDriver {
    pub fn new(cfg: SimConfig) -> SimDriver {
        let seed = cfg.seed;
        SimDriver { cfg, rng: Mutex::new(Rng(seed)), instances: Mutex::new(HashMap::new()) }
    }

    /// Live instances right now (for tests and benchmarks).
    pub fn live(&self) -> usize {
        let now = Instant::now();
        let mut inst = self.instances.lock().expect("sim lock");
        inst.values_mut()
            .map(|i| {
                i.advance(now);
                i.exited.is_none()
            })
            .filter(|alive| *alive)
            .count()
    }

    /// Ends every instance at once, as if the node lost power.
    pub fn power_off(&self) {
        let mut inst = self.instances.lock().expect("sim lock");
        for i in inst.values_mut() {
            if i.exited.is_none() {
                i.exited = Some(LastExit { reason: "killed".into(), code: None });
            }
        }
    }
}

#[async_trait]
impl Driver for SimDriver {
    fn name(&self) -> &'static str {
        "sim"
    }

    /// A simulated instance outlives its agent only inside the same driver
    /// value: a new agent given this driver adopts what it holds.
    async fn adopt(&self) -> Result<Vec<(InstanceSpec, Observed)>, DriverError> {
        let now = Instant::now();
        let mut inst = self.instances.lock().expect("sim lock");
        Ok(inst
            .values_mut()
            .map(|i| {
                i.advance(now);
                let obs = match &i.exited {
                    Some(e) => Observed::Exited(e.clone()),
                    None => Observed::Alive { used_mib: Some(i.used_mib(self.cfg.memory_use, now)) },
                };
                (i.spec.clone(), obs)
            })
            .collect())
    }

    async fn start(&self, spec: &InstanceSpec) -> Result<(), DriverError> {
        let key: Key = (spec.server_id.clone(), spec.generation);
        let (fails, latency, crash_after) = {
            let mut rng = self.rng.lock().expect("sim rng lock");
            let fails = rng.unit() < self.cfg.start_failure_rate;
            let latency = rng.between(self.cfg.start_latency_ms.0, self.cfg.start_latency_ms.1);
            let crash_after = (self.cfg.crashes_per_hour > 0.0).then(|| {
                // Exponential waiting time with the configured mean rate.
                let hours = -(1.0 - rng.unit()).ln() / self.cfg.crashes_per_hour;
                Duration::from_secs_f64((hours * 3600.0).min(1e9))
            });
            (fails, latency, crash_after)
        };
        if fails {
            return Err(DriverError::Transient("simulated start failure".into()));
        }
        let mut inst = self.instances.lock().expect("sim lock");
        if inst.get(&key).is_some_and(|i| i.exited.is_none()) {
            return Err(DriverError::Transient(format!("instance {} generation {} already runs", key.0, key.1)));
        }
        let now = Instant::now();
        let ready_at = now + Duration::from_millis(latency);
        inst.insert(key, SimInstance { spec: spec.clone(), ready_at, crash_at: crash_after.map(|d| ready_at + d), stop_at: None, exited: None });
        Ok(())
    }

    async fn observe_all(&self) -> HashMap<Key, Observed> {
        let now = Instant::now();
        let mut inst = self.instances.lock().expect("sim lock");
        inst.iter_mut()
            .map(|(k, i)| {
                i.advance(now);
                let obs = match &i.exited {
                    Some(e) => Observed::Exited(e.clone()),
                    None => Observed::Alive { used_mib: Some(i.used_mib(self.cfg.memory_use, now)) },
                };
                (k.clone(), obs)
            })
            .collect()
    }

    async fn stop(&self, spec: &InstanceSpec) -> Result<(), DriverError> {
        let key: Key = (spec.server_id.clone(), spec.generation);
        let mut inst = self.instances.lock().expect("sim lock");
        let i = inst.get_mut(&key).ok_or_else(|| DriverError::Transient(format!("no instance {} generation {}", key.0, key.1)))?;
        if i.stop_at.is_none() {
            i.stop_at = Some(Instant::now() + Duration::from_millis(self.cfg.stop_latency_ms));
        }
        Ok(())
    }

    async fn kill(&self, key: &Key, reason: &str) -> Result<(), DriverError> {
        let mut inst = self.instances.lock().expect("sim lock");
        if let Some(i) = inst.get_mut(key) {
            if i.exited.is_none() {
                i.exited = Some(LastExit { reason: reason.to_string(), code: None });
            }
        }
        Ok(())
    }

    async fn forget(&self, key: &Key) {
        self.instances.lock().expect("sim lock").remove(key);
    }

    fn fence_handle(&self, _key: &Key) -> Option<crate::watchdog::FenceHandle> {
        // Nothing outside this process could stop a simulated instance; the
        // agent's own lease check fences it.
        None
    }

    fn enforces_memory_limit(&self, _key: &Key) -> bool {
        true
    }

    fn data_dir(&self, server: &ServerId) -> PathBuf {
        PathBuf::from("/nonexistent/berth-sim").join(&server.0)
    }

    async fn ready(&self, spec: &InstanceSpec) -> bool {
        let key: Key = (spec.server_id.clone(), spec.generation);
        let now = Instant::now();
        let inst = self.instances.lock().expect("sim lock");
        inst.get(&key).is_some_and(|i| i.exited.is_none() && now >= i.ready_at)
    }

    fn host_memory(&self) -> HostStats {
        let now = Instant::now();
        let mut inst = self.instances.lock().expect("sim lock");
        let used: u64 = inst
            .values_mut()
            .map(|i| {
                i.advance(now);
                i.used_mib(self.cfg.memory_use, now)
            })
            .sum();
        HostStats { total_mib: self.cfg.host_total_mib, available_mib: self.cfg.host_total_mib.saturating_sub(used) }
    }

    fn cpu_cores(&self) -> u32 {
        8
    }

    fn port_free(&self, port: u16) -> bool {
        let now = Instant::now();
        let mut inst = self.instances.lock().expect("sim lock");
        !inst.values_mut().any(|i| {
            i.advance(now);
            i.exited.is_none() && i.spec.port == port
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use berth_core::template::ReadyCheck;
    use berth_core::MemMib;

    pub(crate) fn spec(id: &str, generation: u64, mib: u64, port: u16) -> InstanceSpec {
        InstanceSpec {
            server_id: ServerId(id.into()),
            generation,
            template: "fakegame".into(),
            memory_mib: MemMib(mib),
            port,
            command: "unused".into(),
            args: vec![],
            env: Default::default(),
            stop_signal: "SIGTERM".into(),
            stop_command: vec![],
            stop_timeout_ms: 1000,
            ready: ReadyCheck::Alive,
            ready_timeout_ms: 10_000,
            stop_after_ms: 0,
            docker: None,
            permanent_exit_codes: vec![],
        }
    }

    fn quick() -> SimConfig {
        SimConfig { host_total_mib: 4096, start_latency_ms: (30, 30), memory_use: 0.5, stop_latency_ms: 30, ..SimConfig::default() }
    }

    #[tokio::test]
    async fn an_instance_is_ready_after_its_latency_and_uses_its_share() {
        let d = SimDriver::new(quick());
        let s = spec("srv_a", 1, 1024, 30000);
        d.start(&s).await.unwrap();
        assert!(!d.ready(&s).await, "not ready before the start latency");
        assert_eq!(d.host_memory().available_mib, 4096 - 256, "half the share while starting");
        assert!(!d.port_free(30000));
        assert!(d.port_free(30001));
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(d.ready(&s).await);
        assert_eq!(d.host_memory().available_mib, 4096 - 512);
        let seen = d.observe_all().await;
        assert_eq!(seen.get(&(ServerId("srv_a".into()), 1)), Some(&Observed::Alive { used_mib: Some(512) }));
    }

    #[tokio::test]
    async fn a_stop_takes_its_latency_and_frees_memory_and_port() {
        let d = SimDriver::new(quick());
        let s = spec("srv_a", 1, 1024, 30000);
        d.start(&s).await.unwrap();
        d.stop(&s).await.unwrap();
        assert_eq!(d.live(), 1, "still stopping");
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert_eq!(d.live(), 0);
        let seen = d.observe_all().await;
        assert!(matches!(seen.get(&(ServerId("srv_a".into()), 1)), Some(Observed::Exited(e)) if e.reason == "stopped"));
        assert_eq!(d.host_memory().available_mib, 4096);
        assert!(d.port_free(30000));
        d.forget(&(ServerId("srv_a".into()), 1)).await;
        assert!(d.observe_all().await.is_empty());
    }

    #[tokio::test]
    async fn kill_and_power_off_end_instances_with_their_reason() {
        let d = SimDriver::new(quick());
        d.start(&spec("srv_a", 1, 100, 30000)).await.unwrap();
        d.start(&spec("srv_b", 1, 100, 30001)).await.unwrap();
        d.kill(&(ServerId("srv_a".into()), 1), "oom").await.unwrap();
        let seen = d.observe_all().await;
        assert!(matches!(seen.get(&(ServerId("srv_a".into()), 1)), Some(Observed::Exited(e)) if e.reason == "oom"));
        d.power_off();
        assert_eq!(d.live(), 0);
    }

    #[tokio::test]
    async fn failure_and_crash_rates_follow_the_config() {
        let always = SimDriver::new(SimConfig { start_failure_rate: 1.0, ..quick() });
        assert!(matches!(always.start(&spec("srv_a", 1, 100, 30000)).await, Err(DriverError::Transient(_))));
        let never = SimDriver::new(quick());
        for i in 0..100 {
            never.start(&spec(&format!("srv_{i}"), 1, 10, 30000 + i)).await.unwrap();
        }
        // About 3,600,000 crashes per hour: one per millisecond on average.
        let crashy = SimDriver::new(SimConfig { crashes_per_hour: 3_600_000.0, start_latency_ms: (0, 0), ..quick() });
        for i in 0..50 {
            crashy.start(&spec(&format!("srv_{i}"), 1, 10, 30000 + i)).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let crashed = crashy.observe_all().await.values().filter(|o| matches!(o, Observed::Exited(e) if e.code == Some(1))).count();
        assert!(crashed >= 45, "nearly all crash within 100 mean lifetimes, got {crashed}");
        assert_eq!(never.live(), 100);
    }

    #[tokio::test]
    async fn a_new_agent_adopts_what_the_driver_holds_and_a_live_key_is_not_started_twice() {
        let d = SimDriver::new(quick());
        let s = spec("srv_a", 3, 100, 30000);
        d.start(&s).await.unwrap();
        assert!(d.start(&s).await.is_err(), "a live (server, generation) is not started twice");
        let adopted = d.adopt().await.unwrap();
        assert_eq!(adopted.len(), 1);
        assert_eq!(adopted[0].0.generation, 3);
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(SimConfig { memory_use: 1.5, ..SimConfig::default() }.validate().is_err());
        assert!(SimConfig { start_failure_rate: -0.1, ..SimConfig::default() }.validate().is_err());
        assert!(SimConfig { crashes_per_hour: f64::NAN, ..SimConfig::default() }.validate().is_err());
        assert!(SimConfig { start_latency_ms: (5, 1), ..SimConfig::default() }.validate().is_err());
        assert!(SimConfig::default().validate().is_ok());
    }

    #[test]
    fn the_generator_is_repeatable_and_in_range() {
        let (mut a, mut b) = (Rng(7), Rng(7));
        for _ in 0..1000 {
            let x = a.unit();
            assert!((0.0..1.0).contains(&x));
            assert_eq!(x.to_bits(), b.unit().to_bits());
            assert!((3..=9).contains(&a.between(3, 9)));
            b.between(3, 9);
        }
    }
}
