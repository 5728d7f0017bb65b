//! `berth fakegame`: the hidden test workload, a fake Minecraft-like game
//! server. It owns a tiny on-disk world under its data dir (created once and
//! reused across restarts), a `starts.log` that proves how often it was
//! started, a resident memory ballast, and a TCP port that answers both the
//! Minecraft Java server-list ping and Source RCON (as Minecraft implements
//! it). It must stay plain std threads plus `libc` and `serde_json`: no
//! tokio, no dependency on the rest of berth, and it must never overwrite an
//! existing world, because tests rely on the same world surviving restarts.

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Everything the workload is told on its command line.
pub struct FakegameArgs {
    pub port: u16,
    pub data_dir: PathBuf,
    pub max_players: u32,
    pub alloc_mib: u64,
    pub start_delay_ms: u64,
    /// 0 = never crash.
    pub crash_after_ms: u64,
    /// `None` accepts any RCON password.
    pub rcon_password: Option<String>,
}

/// Exit code when the port cannot be bound.
const EXIT_BIND_FAILED: i32 = 2;
/// Exit code of the simulated crash.
const EXIT_CRASHED: i32 = 3;

/// Protocol number of Minecraft 1.20.4, which the status response claims.
const MINECRAFT_PROTOCOL: i64 = 765;
const REGION_FILE_BYTES: usize = 8 * 1024;
/// How long a new connection may take to send the 4 bytes that tell the
/// two protocols apart.
const SNIFF_TIMEOUT: Duration = Duration::from_secs(5);
/// Server-list pings are short-lived; a client silent this long is stuck.
const PING_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// RCON sessions legitimately sit idle (e.g. between `save-off` and
/// `save-on` around a backup), so they get longer before being dropped.
const RCON_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Serverbound Minecraft packets we accept (handshake, status, ping) are
/// tiny; anything larger is a confused or hostile client.
const MAX_MINECRAFT_PACKET: usize = 64 * 1024;
/// Minecraft's own RCON request limit is ~1.4 KiB; be a little generous.
const MAX_RCON_PACKET: usize = 4096 + 10;

const RCON_TYPE_RESPONSE: i32 = 0;
const RCON_TYPE_COMMAND: i32 = 2;
const RCON_TYPE_AUTH_RESPONSE: i32 = 2;
const RCON_TYPE_LOGIN: i32 = 3;
const RCON_AUTH_FAILED_ID: i32 = -1;

/// Set from the signal handler; everything else happens on the watcher
/// thread, because almost nothing is async-signal-safe.
static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);
/// Serializes saves so concurrent `save-all`s and a SIGTERM never interleave
/// writes of level.dat.
static SAVE_LOCK: Mutex<()> = Mutex::new(());
/// Held (forever) by whichever thread ends the process: `exit` is not safe
/// to call from two threads at once.
static EXIT_LOCK: Mutex<()> = Mutex::new(());

/// Runs the workload. Returns only when it cannot start (the exit code to
/// use, or an I/O error preparing the world); every normal ending calls
/// `std::process::exit` from the thread that decided it.
pub fn run(args: FakegameArgs) -> io::Result<i32> {
    let world = Arc::new(World::open_or_create(&args.data_dir)?);
    append_start_record(&args.data_dir)?;

    // Installed before the start delay so a stop during startup still saves
    // and exits 0, like a real server would.
    install_stop_signal_handlers()?;
    {
        let world = Arc::clone(&world);
        thread::Builder::new().name("fakegame-signals".into()).spawn(move || watch_for_stop_signal(&world))?;
    }

    thread::sleep(Duration::from_millis(args.start_delay_ms));
    let mut ballast = allocate_resident_ballast(args.alloc_mib)?;

    let listener = match TcpListener::bind(("0.0.0.0", args.port)) {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("fakegame: cannot bind 0.0.0.0:{}: {err}", args.port);
            return Ok(EXIT_BIND_FAILED);
        }
    };
    let bound_port = listener.local_addr()?.port();

    if args.crash_after_ms > 0 {
        let crash_after = Duration::from_millis(args.crash_after_ms);
        thread::Builder::new().name("fakegame-crash".into()).spawn(move || {
            thread::sleep(crash_after);
            eprintln!("fakegame: crashing as configured");
            exit_process(EXIT_CRASHED);
        })?;
    }

    // Printed with the port actually bound so callers may pass port 0.
    let mut stdout = io::stdout();
    writeln!(stdout, "fakegame listening on {bound_port}")?;
    stdout.flush()?;

    let server = Arc::new(ServerInfo { max_players: args.max_players, rcon_password: args.rcon_password, world });
    loop {
        // Keeps the ballast observable, so it is neither optimized away nor
        // dropped: this loop never ends.
        std::hint::black_box(&mut ballast);
        match listener.accept() {
            Ok((stream, _)) => {
                let server = Arc::clone(&server);
                let spawned = thread::Builder::new().name("fakegame-conn".into()).spawn(move || handle_connection(stream, &server));
                if let Err(err) = spawned {
                    eprintln!("fakegame: cannot spawn connection thread: {err}");
                }
            }
            Err(err) => {
                // Usually transient (EMFILE, ECONNABORTED); don't spin on it.
                eprintln!("fakegame: accept failed: {err}");
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// What connection handlers need to answer clients.
struct ServerInfo {
    max_players: u32,
    rcon_password: Option<String>,
    world: Arc<World>,
}

// ---------------------------------------------------------------------------
// World, start records, memory
// ---------------------------------------------------------------------------

struct World {
    level_dat: PathBuf,
}

impl World {
    /// Creates `world/level.dat` and `world/region/r.0.0.mca` only where
    /// missing; an existing world is reused untouched.
    fn open_or_create(data_dir: &Path) -> io::Result<World> {
        let world_dir = data_dir.join("world");
        let region_dir = world_dir.join("region");
        fs::create_dir_all(&region_dir)?;

        let level_dat = world_dir.join("level.dat");
        let initial_level = format!("berth-fakegame level\ncreated_at={}\n", unix_ms());
        write_if_missing(&level_dat, initial_level.as_bytes())?;
        write_if_missing(&region_dir.join("r.0.0.mca"), &region_bytes())?;
        Ok(World { level_dat })
    }

    /// Rewrites level.dat with a fresh `saved_at`, keeping everything else
    /// (notably `created_at`, which tests use to detect a recreated world).
    fn save(&self) -> io::Result<()> {
        let _guard = SAVE_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let previous = fs::read_to_string(&self.level_dat).unwrap_or_default();
        let mut contents: String = previous.lines().filter(|line| !line.starts_with("saved_at=")).map(|line| format!("{line}\n")).collect();
        contents.push_str(&format!("saved_at={}\n", unix_ms()));

        // Write-then-rename so a crash mid-save never leaves a torn file.
        let temporary = self.level_dat.with_extension("dat.tmp");
        let mut file = fs::File::create(&temporary)?;
        file.write_all(contents.as_bytes())?;
        file.sync_all()?;
        fs::rename(&temporary, &self.level_dat)
    }
}

/// `create_new` makes "only if missing" race-free.
fn write_if_missing(path: &Path, contents: &[u8]) -> io::Result<()> {
    match OpenOptions::new().write(true).create_new(true).open(path) {
        Ok(mut file) => file.write_all(contents),
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(err) => Err(err),
    }
}

/// Deterministic filler so two freshly created worlds are byte-identical.
fn region_bytes() -> Vec<u8> {
    (0..REGION_FILE_BYTES as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect()
}

/// One line per start; tests count lines to prove a single start.
fn append_start_record(data_dir: &Path) -> io::Result<()> {
    let line = format!("{} {}\n", unix_ms(), std::process::id());
    let mut log = OpenOptions::new().create(true).append(true).open(data_dir.join("starts.log"))?;
    // A single write on an O_APPEND file keeps lines whole.
    log.write_all(line.as_bytes())
}

/// Allocates `mib` MiB and writes to every page so the memory is resident,
/// which is what memory accounting in tests measures.
fn allocate_resident_ballast(mib: u64) -> io::Result<Vec<u8>> {
    let bytes = usize::try_from(mib)
        .ok()
        .and_then(|mib| mib.checked_mul(1024 * 1024))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "alloc_mib too large"))?;
    let mut ballast = Vec::new();
    ballast.try_reserve_exact(bytes).map_err(|err| io::Error::new(io::ErrorKind::OutOfMemory, err))?;
    ballast.resize(bytes, 0);
    for byte in ballast.iter_mut().step_by(4096) {
        *byte = 1;
    }
    std::hint::black_box(&mut ballast);
    Ok(ballast)
}

fn unix_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_millis()).unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Stopping
// ---------------------------------------------------------------------------

extern "C" fn on_stop_signal(_signal: libc::c_int) {
    STOP_REQUESTED.store(true, Ordering::SeqCst);
}

fn install_stop_signal_handlers() -> io::Result<()> {
    let handler = on_stop_signal as extern "C" fn(libc::c_int);
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe; the sigaction struct is fully initialized
        // (zeroed, then mask emptied) before use.
        let installed = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = handler as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if installed != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn watch_for_stop_signal(world: &World) {
    while !STOP_REQUESTED.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(50));
    }
    save_and_exit(world);
}

/// The graceful stop shared by signals and RCON `stop`.
fn save_and_exit(world: &World) -> ! {
    let _exiting = EXIT_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Err(err) = world.save() {
        eprintln!("fakegame: save failed while stopping: {err}");
        exit_holding_lock(1);
    }
    println!("saved, stopping");
    let _ = io::stdout().flush();
    exit_holding_lock(0);
}

fn exit_process(code: i32) -> ! {
    let _exiting = EXIT_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    exit_holding_lock(code);
}

/// Must only be called while holding `EXIT_LOCK`.
fn exit_holding_lock(code: i32) -> ! {
    let _ = io::stdout().flush();
    std::process::exit(code);
}

// ---------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------

enum ClientProtocol {
    MinecraftPing,
    Rcon,
}

fn handle_connection(stream: TcpStream, server: &ServerInfo) {
    let peer = stream.peer_addr().map(|addr| addr.to_string()).unwrap_or_else(|_| "unknown peer".into());
    let result = match sniff_protocol(&stream) {
        Ok(Some(ClientProtocol::MinecraftPing)) => serve_minecraft_ping(stream, server),
        Ok(Some(ClientProtocol::Rcon)) => serve_rcon(stream, server),
        Ok(None) => Ok(()),
        Err(err) => Err(err),
    };
    match result {
        Ok(()) => {}
        // Clients hanging up mid-conversation is normal (probes, port scans).
        Err(err) if matches!(err.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe) => {}
        Err(err) => eprintln!("fakegame: connection from {peer}: {err}"),
    }
}

/// Tells the protocols apart from the first 4 bytes: an RCON frame starts
/// with a little-endian i32 length whose high bytes are zero, while a
/// Minecraft handshake's bytes 2..4 hold the (non-zero) protocol version.
/// `None` means the client went away or stayed silent.
fn sniff_protocol(stream: &TcpStream) -> io::Result<Option<ClientProtocol>> {
    let deadline = Instant::now() + SNIFF_TIMEOUT;
    let mut first = [0u8; 4];
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Ok(None);
        }
        stream.set_read_timeout(Some(remaining))?;
        match stream.peek(&mut first) {
            Ok(0) => return Ok(None),
            Ok(n) if n >= first.len() => break,
            // peek returns whatever has arrived so far; wait for the rest.
            Ok(_) => thread::sleep(Duration::from_millis(10)),
            Err(err) if matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => return Ok(None),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(Some(if first[2] == 0 && first[3] == 0 { ClientProtocol::Rcon } else { ClientProtocol::MinecraftPing }))
}

// ---------------------------------------------------------------------------
// Minecraft server-list ping
// ---------------------------------------------------------------------------

const HANDSHAKE_PACKET_ID: i32 = 0x00;
const STATUS_PACKET_ID: i32 = 0x00;
const PING_PACKET_ID: i32 = 0x01;
const NEXT_STATE_STATUS: i32 = 1;

fn serve_minecraft_ping(mut stream: TcpStream, server: &ServerInfo) -> io::Result<()> {
    stream.set_read_timeout(Some(PING_IDLE_TIMEOUT))?;
    stream.set_write_timeout(Some(PING_IDLE_TIMEOUT))?;

    let (packet_id, handshake) = read_minecraft_packet(&mut stream)?;
    if packet_id != HANDSHAKE_PACKET_ID {
        return Err(invalid_data(format!("expected handshake, got packet {packet_id:#x}")));
    }
    let mut fields = handshake.as_slice();
    let _protocol_version = read_varint(&mut fields)?;
    let _server_address = read_minecraft_string(&mut fields)?;
    let mut server_port = [0u8; 2];
    fields.read_exact(&mut server_port)?;
    if read_varint(&mut fields)? != NEXT_STATE_STATUS {
        // Login (state 2) is not something a fake server can do; a real
        // server would kick here, closing is close enough.
        return Ok(());
    }

    loop {
        let (packet_id, payload) = match read_minecraft_packet(&mut stream) {
            Ok(packet) => packet,
            // Clients may hang up right after the status response.
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(err) => return Err(err),
        };
        match packet_id {
            STATUS_PACKET_ID => {
                let mut response = Vec::new();
                write_minecraft_string(&mut response, &status_json(server.max_players));
                write_minecraft_packet(&mut stream, STATUS_PACKET_ID, &response)?;
            }
            PING_PACKET_ID => {
                if payload.len() != 8 {
                    return Err(invalid_data("ping payload is not an i64".into()));
                }
                write_minecraft_packet(&mut stream, PING_PACKET_ID, &payload)?;
                return Ok(());
            }
            other => return Err(invalid_data(format!("unexpected status packet {other:#x}"))),
        }
    }
}

fn status_json(max_players: u32) -> String {
    serde_json::json!({
        "version": { "name": "berth-fakegame", "protocol": MINECRAFT_PROTOCOL },
        "players": { "max": max_players, "online": 0, "sample": [] },
        "description": { "text": "berth fakegame" },
    })
    .to_string()
}

/// Reads one length-prefixed packet; returns its id and the rest.
fn read_minecraft_packet(stream: &mut impl Read) -> io::Result<(i32, Vec<u8>)> {
    let length = read_varint(stream)?;
    let length = usize::try_from(length)
        .ok()
        .filter(|length| (1..=MAX_MINECRAFT_PACKET).contains(length))
        .ok_or_else(|| invalid_data(format!("packet length {length} out of range")))?;
    let mut packet = vec![0u8; length];
    stream.read_exact(&mut packet)?;
    let mut body = packet.as_slice();
    let packet_id = read_varint(&mut body)?;
    Ok((packet_id, body.to_vec()))
}

/// Writes a whole packet with one `write_all` so it leaves in one segment.
fn write_minecraft_packet(stream: &mut impl Write, packet_id: i32, payload: &[u8]) -> io::Result<()> {
    let mut body = Vec::with_capacity(payload.len() + 5);
    write_varint(&mut body, packet_id);
    body.extend_from_slice(payload);
    let mut frame = Vec::with_capacity(body.len() + 5);
    write_varint(&mut frame, body.len() as i32);
    frame.extend_from_slice(&body);
    stream.write_all(&frame)?;
    stream.flush()
}

fn read_minecraft_string(reader: &mut impl Read) -> io::Result<String> {
    let length = read_varint(reader)?;
    let length = usize::try_from(length)
        .ok()
        .filter(|length| *length <= MAX_MINECRAFT_PACKET)
        .ok_or_else(|| invalid_data(format!("string length {length} out of range")))?;
    let mut bytes = vec![0u8; length];
    reader.read_exact(&mut bytes)?;
    String::from_utf8(bytes).map_err(|_| invalid_data("string is not utf-8".into()))
}

fn write_minecraft_string(out: &mut Vec<u8>, value: &str) {
    write_varint(out, value.len() as i32);
    out.extend_from_slice(value.as_bytes());
}

/// Minecraft VarInt: 7 bits per byte, least significant group first, high
/// bit set on every byte but the last; negative values take 5 bytes.
fn write_varint(out: &mut Vec<u8>, value: i32) {
    let mut remaining = value as u32;
    loop {
        let group = (remaining & 0x7f) as u8;
        remaining >>= 7;
        if remaining == 0 {
            out.push(group);
            return;
        }
        out.push(group | 0x80);
    }
}

/// Reads a VarInt from a stream or, via `&mut &[u8]`, from a buffer.
fn read_varint(reader: &mut impl Read) -> io::Result<i32> {
    let mut value: u32 = 0;
    for index in 0..5 {
        let mut byte = [0u8; 1];
        reader.read_exact(&mut byte)?;
        value |= u32::from(byte[0] & 0x7f) << (7 * index);
        if byte[0] & 0x80 == 0 {
            return Ok(value as i32);
        }
    }
    Err(invalid_data("varint longer than 5 bytes".into()))
}

fn invalid_data(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

// ---------------------------------------------------------------------------
// RCON
// ---------------------------------------------------------------------------

struct RconRequest {
    id: i32,
    kind: i32,
    body: String,
}

/// What the server does after answering one command.
enum AfterCommand {
    Continue,
    Stop,
}

fn serve_rcon(mut stream: TcpStream, server: &ServerInfo) -> io::Result<()> {
    stream.set_read_timeout(Some(RCON_IDLE_TIMEOUT))?;
    stream.set_write_timeout(Some(PING_IDLE_TIMEOUT))?;
    let mut authenticated = false;
    loop {
        let request = match read_rcon_request(&mut stream) {
            Ok(request) => request,
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(err) => return Err(err),
        };
        // Mirrors Minecraft's RconClient: a failed login also revokes an
        // earlier successful one, and failures answer with id -1.
        match request.kind {
            RCON_TYPE_LOGIN => {
                authenticated = match &server.rcon_password {
                    None => true,
                    Some(password) => *password == request.body,
                };
                let id = if authenticated { request.id } else { RCON_AUTH_FAILED_ID };
                write_rcon_packet(&mut stream, id, RCON_TYPE_AUTH_RESPONSE, "")?;
            }
            RCON_TYPE_COMMAND if !authenticated => {
                write_rcon_packet(&mut stream, RCON_AUTH_FAILED_ID, RCON_TYPE_AUTH_RESPONSE, "")?;
            }
            RCON_TYPE_COMMAND => {
                let (reply, after) = run_rcon_command(&request.body, server)?;
                write_rcon_packet(&mut stream, request.id, RCON_TYPE_RESPONSE, &reply)?;
                if let AfterCommand::Stop = after {
                    // The reply must reach the client before we go away; a
                    // FIN after it (rather than exit's implicit close racing
                    // unread input into an RST) makes that reliable.
                    let _ = stream.shutdown(Shutdown::Write);
                    save_and_exit(&server.world);
                }
            }
            other => {
                let reply = format!("Unknown request {other:x}");
                write_rcon_packet(&mut stream, request.id, RCON_TYPE_RESPONSE, &reply)?;
            }
        }
    }
}

fn run_rcon_command(command: &str, server: &ServerInfo) -> io::Result<(String, AfterCommand)> {
    // Minecraft accepts commands with or without the leading slash, and
    // extra arguments (`save-all flush`) don't change what we do.
    let name = command.trim().trim_start_matches('/').split_whitespace().next().unwrap_or("");
    let reply = match name {
        "list" => format!("There are 0 of a max of {} players online: ", server.max_players),
        "save-all" => {
            server.world.save()?;
            "Saved the game".to_string()
        }
        "save-off" => "Automatic saving is now disabled".to_string(),
        "save-on" => "Automatic saving is now enabled".to_string(),
        "stop" => return Ok(("Stopping the server".to_string(), AfterCommand::Stop)),
        _ => "Unknown command".to_string(),
    };
    Ok((reply, AfterCommand::Continue))
}

/// Frame: i32 LE length of the rest, i32 LE id, i32 LE type, body, NUL, NUL.
fn read_rcon_request(stream: &mut impl Read) -> io::Result<RconRequest> {
    let mut length_bytes = [0u8; 4];
    stream.read_exact(&mut length_bytes)?;
    let length = i32::from_le_bytes(length_bytes);
    let length = usize::try_from(length)
        .ok()
        .filter(|length| (10..=MAX_RCON_PACKET).contains(length))
        .ok_or_else(|| invalid_data(format!("rcon packet length {length} out of range")))?;
    let mut packet = vec![0u8; length];
    stream.read_exact(&mut packet)?;
    let id = i32::from_le_bytes([packet[0], packet[1], packet[2], packet[3]]);
    let kind = i32::from_le_bytes([packet[4], packet[5], packet[6], packet[7]]);
    // The body ends at the first NUL; be lenient about the padding after it.
    let body = &packet[8..];
    let body = &body[..body.iter().position(|&b| b == 0).unwrap_or(body.len())];
    Ok(RconRequest { id, kind, body: String::from_utf8_lossy(body).into_owned() })
}

fn write_rcon_packet(stream: &mut impl Write, id: i32, kind: i32, body: &str) -> io::Result<()> {
    let length = (4 + 4 + body.len() + 2) as i32;
    let mut frame = Vec::with_capacity(4 + length as usize);
    frame.extend_from_slice(&length.to_le_bytes());
    frame.extend_from_slice(&id.to_le_bytes());
    frame.extend_from_slice(&kind.to_le_bytes());
    frame.extend_from_slice(body.as_bytes());
    frame.extend_from_slice(&[0, 0]);
    stream.write_all(&frame)?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(value: i32) -> Vec<u8> {
        let mut out = Vec::new();
        write_varint(&mut out, value);
        out
    }

    #[test]
    fn varint_encodes_known_values() {
        // Examples from the Minecraft protocol documentation.
        assert_eq!(encoded(0), [0x00]);
        assert_eq!(encoded(1), [0x01]);
        assert_eq!(encoded(127), [0x7f]);
        assert_eq!(encoded(128), [0x80, 0x01]);
        assert_eq!(encoded(255), [0xff, 0x01]);
        assert_eq!(encoded(765), [0xfd, 0x05]);
        assert_eq!(encoded(25565), [0xdd, 0xc7, 0x01]);
        assert_eq!(encoded(2_097_151), [0xff, 0xff, 0x7f]);
        assert_eq!(encoded(i32::MAX), [0xff, 0xff, 0xff, 0xff, 0x07]);
        assert_eq!(encoded(-1), [0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert_eq!(encoded(i32::MIN), [0x80, 0x80, 0x80, 0x80, 0x08]);
    }

    #[test]
    fn varint_round_trips() {
        for value in [0, 1, 127, 128, 300, 765, 25565, i32::MAX, -1, -765, i32::MIN] {
            let bytes = encoded(value);
            let mut reader = bytes.as_slice();
            assert_eq!(read_varint(&mut reader).unwrap(), value);
            assert!(reader.is_empty(), "{value} left bytes unread");
        }
    }

    #[test]
    fn varint_read_stops_at_last_byte() {
        let mut reader: &[u8] = &[0xdd, 0xc7, 0x01, 0x42];
        assert_eq!(read_varint(&mut reader).unwrap(), 25565);
        assert_eq!(reader, [0x42]);
    }

    #[test]
    fn varint_rejects_more_than_five_bytes() {
        let mut reader: &[u8] = &[0x80, 0x80, 0x80, 0x80, 0x80, 0x01];
        let err = read_varint(&mut reader).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn varint_reports_truncation_as_eof() {
        let mut reader: &[u8] = &[0x80, 0x80];
        let err = read_varint(&mut reader).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn minecraft_packet_round_trips() {
        let mut frame = Vec::new();
        write_minecraft_packet(&mut frame, PING_PACKET_ID, &42i64.to_be_bytes()).unwrap();
        assert_eq!(frame[0], 9, "length covers id and payload");
        let (id, payload) = read_minecraft_packet(&mut frame.as_slice()).unwrap();
        assert_eq!(id, PING_PACKET_ID);
        assert_eq!(payload, 42i64.to_be_bytes());
    }

    #[test]
    fn rcon_packet_round_trips() {
        let mut frame = Vec::new();
        write_rcon_packet(&mut frame, 7, RCON_TYPE_COMMAND, "list").unwrap();
        assert_eq!(&frame[..4], &14i32.to_le_bytes());
        let request = read_rcon_request(&mut frame.as_slice()).unwrap();
        assert_eq!((request.id, request.kind, request.body.as_str()), (7, 2, "list"));
    }

    #[test]
    fn rcon_rejects_absurd_length() {
        let frame = 1_000_000i32.to_le_bytes();
        let err = read_rcon_request(&mut frame.as_slice()).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn region_bytes_are_deterministic() {
        assert_eq!(region_bytes().len(), REGION_FILE_BYTES);
        assert_eq!(region_bytes(), region_bytes());
    }
}
