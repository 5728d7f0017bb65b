//! Probes the agent uses to see whether a game server is up: the Minecraft
//! Java server-list ping, a Source RCON client (as Minecraft implements it),
//! a plain TCP connect check, and /proc/net lookups for bound ports. It owns
//! only the wire formats and their parsing; it must not decide what a probe
//! result means for a server's state (that belongs to the caller), must
//! never block without a timeout, and must never allocate a buffer whose
//! size a peer chose without bounding it first.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest frame either protocol may send us; real replies are far smaller.
const MAX_FRAME_BYTES: usize = 1024 * 1024;
/// The protocol number of Minecraft 1.20.4, sent in the handshake. Servers
/// answer status requests regardless of the version a client claims.
const HANDSHAKE_PROTOCOL: i32 = 765;
const HANDSHAKE_ADDRESS: &str = "127.0.0.1";
const NEXT_STATE_STATUS: i32 = 1;
const STATUS_PACKET_ID: i32 = 0x00;
const PING_PACKET_ID: i32 = 0x01;

const RCON_TYPE_RESPONSE: i32 = 0;
const RCON_TYPE_COMMAND: i32 = 2;
const RCON_TYPE_AUTH_RESPONSE: i32 = 2;
const RCON_TYPE_LOGIN: i32 = 3;
const RCON_AUTH_FAILED_ID: i32 = -1;
/// Minecraft splits long command output into bodies of exactly this many
/// bytes; a shorter body is the last one.
const RCON_MAX_RESPONSE_CHUNK: usize = 4096;

/// TCP state LISTEN in /proc/net/tcp{,6}.
const TCP_STATE_LISTEN: u8 = 0x0A;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("connect to {addr} failed: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("timed out after {after:?} while {stage}")]
    Timeout { stage: &'static str, after: Duration },
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("connection closed by peer")]
    Closed,
    #[error("frame length {0} out of range")]
    FrameLength(i64),
    #[error("malformed varint")]
    MalformedVarInt,
    #[error("malformed packet: {0}")]
    MalformedPacket(&'static str),
    #[error("unexpected packet id {0:#04x}")]
    UnexpectedPacket(i32),
    #[error("invalid status json: {0}")]
    StatusJson(#[from] serde_json::Error),
    #[error("status json lacks {0}")]
    StatusField(&'static str),
    #[error("pong payload does not match ping")]
    PongMismatch,
    #[error("rcon authentication failed")]
    RconAuthFailed,
    #[error("rcon payload must not contain nul bytes")]
    RconNulInPayload,
}

/// What a server reported in its status response, plus the measured ping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PingStatus {
    pub version_name: String,
    pub protocol: i64,
    pub max_players: i64,
    pub online_players: i64,
    pub latency_ms: u64,
}

/// Runs the server-list ping: handshake, status request, ping. Every step
/// (connect, each write, each read) is bounded by `timeout`.
pub async fn minecraft_ping(addr: SocketAddr, timeout: Duration) -> Result<PingStatus, ProbeError> {
    let mut stream = connect(addr, timeout).await?;

    let mut handshake = Vec::new();
    write_varint(&mut handshake, HANDSHAKE_PROTOCOL);
    write_string(&mut handshake, HANDSHAKE_ADDRESS);
    handshake.extend_from_slice(&addr.port().to_be_bytes());
    write_varint(&mut handshake, NEXT_STATE_STATUS);
    let mut request = minecraft_frame(0x00, &handshake);
    request.extend_from_slice(&minecraft_frame(STATUS_PACKET_ID, &[]));
    within(timeout, "sending status request", stream.write_all(&request)).await??;

    let (packet_id, payload) = within(timeout, "reading status response", read_minecraft_packet(&mut stream)).await??;
    if packet_id != STATUS_PACKET_ID {
        return Err(ProbeError::UnexpectedPacket(packet_id));
    }
    let mut fields = payload.as_slice();
    let json = read_string(&mut fields)?;
    let status = parse_status_json(&json)?;

    let payload = unix_ms();
    let sent_at = Instant::now();
    let ping = minecraft_frame(PING_PACKET_ID, &payload.to_be_bytes());
    within(timeout, "sending ping", stream.write_all(&ping)).await??;
    let (packet_id, pong) = within(timeout, "reading pong", read_minecraft_packet(&mut stream)).await??;
    let latency = sent_at.elapsed();
    if packet_id != PING_PACKET_ID {
        return Err(ProbeError::UnexpectedPacket(packet_id));
    }
    if pong != payload.to_be_bytes() {
        return Err(ProbeError::PongMismatch);
    }

    Ok(PingStatus { latency_ms: u64::try_from(latency.as_millis()).unwrap_or(u64::MAX), ..status })
}

/// Extracts the fields we use; `latency_ms` is left 0 for the caller.
fn parse_status_json(json: &str) -> Result<PingStatus, ProbeError> {
    let value: serde_json::Value = serde_json::from_str(json)?;
    let field = |pointer: &'static str| value.pointer(pointer).ok_or(ProbeError::StatusField(pointer));
    let integer = |pointer: &'static str| field(pointer)?.as_i64().ok_or(ProbeError::StatusField(pointer));
    Ok(PingStatus {
        version_name: field("/version/name")?.as_str().ok_or(ProbeError::StatusField("/version/name"))?.to_string(),
        protocol: integer("/version/protocol")?,
        max_players: integer("/players/max")?,
        online_players: integer("/players/online")?,
        latency_ms: 0,
    })
}

/// A connected, logged-in RCON session.
#[derive(Debug)]
pub struct RconClient {
    stream: TcpStream,
    timeout: Duration,
    last_request_id: i32,
}

impl RconClient {
    /// Connects and logs in; `timeout` bounds each step here and in later
    /// commands.
    pub async fn connect(addr: SocketAddr, password: &str, timeout: Duration) -> Result<RconClient, ProbeError> {
        let stream = connect(addr, timeout).await?;
        let mut client = RconClient { stream, timeout, last_request_id: 0 };
        let id = client.send(RCON_TYPE_LOGIN, password).await?;
        loop {
            let reply = client.read_reply("reading rcon login response").await?;
            // Source-engine servers send an empty response value before the
            // auth response; Minecraft sends only the latter.
            if reply.kind != RCON_TYPE_AUTH_RESPONSE {
                continue;
            }
            if reply.id == RCON_AUTH_FAILED_ID {
                return Err(ProbeError::RconAuthFailed);
            }
            if reply.id == id {
                return Ok(client);
            }
        }
    }

    /// Runs one command and returns its output. Output Minecraft splits
    /// into several packets is joined.
    pub async fn command(&mut self, cmd: &str) -> Result<String, ProbeError> {
        let id = self.send(RCON_TYPE_COMMAND, cmd).await?;
        // Bytes, not strings: a chunk boundary may split a UTF-8 character.
        let mut output = Vec::new();
        let mut chunks = 0;
        loop {
            let reply = match self.read_reply("reading rcon command response").await {
                Ok(reply) => reply,
                // Output of exactly a multiple of the chunk size looks
                // unfinished; silence after a full chunk means it was not.
                Err(ProbeError::Timeout { .. }) if chunks > 0 => break,
                Err(err) => return Err(err),
            };
            if reply.id == RCON_AUTH_FAILED_ID {
                return Err(ProbeError::RconAuthFailed);
            }
            // Replies to an earlier command that timed out may still be in
            // the stream; they are not ours.
            if reply.id != id || reply.kind != RCON_TYPE_RESPONSE {
                continue;
            }
            chunks += 1;
            output.extend_from_slice(&reply.body);
            if reply.body.len() < RCON_MAX_RESPONSE_CHUNK {
                break;
            }
        }
        Ok(String::from_utf8_lossy(&output).into_owned())
    }

    async fn send(&mut self, kind: i32, body: &str) -> Result<i32, ProbeError> {
        if body.as_bytes().contains(&0) {
            return Err(ProbeError::RconNulInPayload);
        }
        // Positive ids only: -1 is the server's "not authenticated".
        self.last_request_id = self.last_request_id.checked_add(1).unwrap_or(1);
        let id = self.last_request_id;
        let frame = rcon_frame(id, kind, body.as_bytes())?;
        within(self.timeout, "sending rcon request", self.stream.write_all(&frame)).await??;
        Ok(id)
    }

    async fn read_reply(&mut self, stage: &'static str) -> Result<RconPacket, ProbeError> {
        within(self.timeout, stage, read_rcon_packet(&mut self.stream)).await?
    }
}

/// True if a TCP connection to `addr` is accepted within `timeout`.
pub async fn tcp_ready(addr: SocketAddr, timeout: Duration) -> bool {
    matches!(tokio::time::timeout(timeout, TcpStream::connect(addr)).await, Ok(Ok(_)))
}

/// True if any UDP socket (IPv4 or IPv6) is bound to local port `port`.
pub fn udp_port_bound(port: u16) -> bool {
    ["/proc/net/udp", "/proc/net/udp6"].iter().any(|path| proc_net_table_has_port(&read_proc_table(path), port, None))
}

/// True if a TCP socket (IPv4 or IPv6) listens on local port `port`.
pub fn tcp_port_listening(port: u16) -> bool {
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|path| proc_net_table_has_port(&read_proc_table(path), port, Some(TCP_STATE_LISTEN)))
}

/// True if a UDP socket is bound to `port` in the network namespace of
/// process `pid` (e.g. a container's init), read from /proc/<pid>/net.
pub fn udp_port_bound_in(pid: i64, port: u16) -> bool {
    ["udp", "udp6"].iter().any(|t| proc_net_table_has_port(&read_proc_table(&format!("/proc/{pid}/net/{t}")), port, None))
}

/// True if a TCP socket listens on `port` in the network namespace of
/// process `pid`. Unlike a connect through a published port, this is not
/// fooled by the engine's proxy, which accepts before the server does.
pub fn tcp_port_listening_in(pid: i64, port: u16) -> bool {
    ["tcp", "tcp6"].iter().any(|t| proc_net_table_has_port(&read_proc_table(&format!("/proc/{pid}/net/{t}")), port, Some(TCP_STATE_LISTEN)))
}

/// A missing table (e.g. IPv6 disabled) simply lists nothing.
fn read_proc_table(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Scans a /proc/net/{tcp,udp}{,6} table. Each row after the header reads
/// `sl local_address rem_address st ...`, where local_address is
/// `<hex ip>:<hex port>` and st is the hex socket state.
fn proc_net_table_has_port(table: &str, port: u16, required_state: Option<u8>) -> bool {
    table.lines().skip(1).any(|row| {
        let mut columns = row.split_whitespace();
        let local_address = columns.nth(1);
        let state = columns.nth(1);
        let local_port = local_address.and_then(|address| address.rsplit_once(':')).and_then(|(_, hex_port)| u16::from_str_radix(hex_port, 16).ok());
        let state = state.and_then(|hex| u8::from_str_radix(hex, 16).ok());
        local_port == Some(port) && required_state.map_or(state.is_some(), |wanted| state == Some(wanted))
    })
}

// ---------------------------------------------------------------------------
// Wire helpers
// ---------------------------------------------------------------------------

async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ProbeError> {
    within(timeout, "connecting", TcpStream::connect(addr)).await?.map_err(|source| ProbeError::Connect { addr, source })
}

/// Bounds one step by `timeout`, naming the step in the error.
async fn within<T>(timeout: Duration, stage: &'static str, step: impl std::future::Future<Output = T>) -> Result<T, ProbeError> {
    tokio::time::timeout(timeout, step).await.map_err(|_| ProbeError::Timeout { stage, after: timeout })
}

/// EOF at a frame boundary means the server hung up on us.
fn eof_as_closed(err: std::io::Error) -> ProbeError {
    if err.kind() == std::io::ErrorKind::UnexpectedEof {
        ProbeError::Closed
    } else {
        ProbeError::Io(err)
    }
}

fn checked_frame_length(length: i64) -> Result<usize, ProbeError> {
    usize::try_from(length).ok().filter(|length| *length <= MAX_FRAME_BYTES).ok_or(ProbeError::FrameLength(length))
}

fn minecraft_frame(packet_id: i32, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(payload.len() + 5);
    write_varint(&mut body, packet_id);
    body.extend_from_slice(payload);
    let mut frame = Vec::with_capacity(body.len() + 5);
    write_varint(&mut frame, body.len() as i32);
    frame.extend_from_slice(&body);
    frame
}

async fn read_minecraft_packet(stream: &mut TcpStream) -> Result<(i32, Vec<u8>), ProbeError> {
    let mut length: u32 = 0;
    let mut complete = false;
    for index in 0..5 {
        let byte = stream.read_u8().await.map_err(eof_as_closed)?;
        length |= u32::from(byte & 0x7f) << (7 * index);
        if byte & 0x80 == 0 {
            complete = true;
            break;
        }
    }
    if !complete {
        return Err(ProbeError::MalformedVarInt);
    }
    let length = checked_frame_length(i64::from(length as i32))?;
    if length == 0 {
        return Err(ProbeError::FrameLength(0));
    }
    let mut packet = vec![0u8; length];
    stream.read_exact(&mut packet).await.map_err(eof_as_closed)?;
    let mut body = packet.as_slice();
    let packet_id = read_varint(&mut body)?;
    Ok((packet_id, body.to_vec()))
}

/// Minecraft VarInt: 7 bits per byte, least significant group first.
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

/// Reads a VarInt from the front of `buffer`, advancing it.
fn read_varint(buffer: &mut &[u8]) -> Result<i32, ProbeError> {
    let mut value: u32 = 0;
    for index in 0..5 {
        let (&byte, rest) = buffer.split_first().ok_or(ProbeError::MalformedPacket("truncated varint"))?;
        *buffer = rest;
        value |= u32::from(byte & 0x7f) << (7 * index);
        if byte & 0x80 == 0 {
            return Ok(value as i32);
        }
    }
    Err(ProbeError::MalformedVarInt)
}

fn write_string(out: &mut Vec<u8>, value: &str) {
    write_varint(out, value.len() as i32);
    out.extend_from_slice(value.as_bytes());
}

fn read_string(buffer: &mut &[u8]) -> Result<String, ProbeError> {
    let length = checked_frame_length(i64::from(read_varint(buffer)?))?;
    if buffer.len() < length {
        return Err(ProbeError::MalformedPacket("string longer than its packet"));
    }
    let (bytes, rest) = buffer.split_at(length);
    *buffer = rest;
    String::from_utf8(bytes.to_vec()).map_err(|_| ProbeError::MalformedPacket("string is not utf-8"))
}

struct RconPacket {
    id: i32,
    kind: i32,
    body: Vec<u8>,
}

/// Frame: i32 LE length of the rest, i32 LE id, i32 LE type, body, NUL, NUL.
fn rcon_frame(id: i32, kind: i32, body: &[u8]) -> Result<Vec<u8>, ProbeError> {
    let length = 4 + 4 + body.len() + 2;
    let length_field = i32::try_from(checked_frame_length(length as i64)?).map_err(|_| ProbeError::FrameLength(length as i64))?;
    let mut frame = Vec::with_capacity(4 + length);
    frame.extend_from_slice(&length_field.to_le_bytes());
    frame.extend_from_slice(&id.to_le_bytes());
    frame.extend_from_slice(&kind.to_le_bytes());
    frame.extend_from_slice(body);
    frame.extend_from_slice(&[0, 0]);
    Ok(frame)
}

async fn read_rcon_packet(stream: &mut TcpStream) -> Result<RconPacket, ProbeError> {
    let length = stream.read_i32_le().await.map_err(eof_as_closed)?;
    let length = checked_frame_length(i64::from(length))?;
    if length < 10 {
        return Err(ProbeError::FrameLength(length as i64));
    }
    let mut packet = vec![0u8; length];
    stream.read_exact(&mut packet).await.map_err(eof_as_closed)?;
    Ok(parse_rcon_packet(&packet))
}

/// `packet` is everything after the length field, at least 10 bytes.
fn parse_rcon_packet(packet: &[u8]) -> RconPacket {
    let id = i32::from_le_bytes([packet[0], packet[1], packet[2], packet[3]]);
    let kind = i32::from_le_bytes([packet[4], packet[5], packet[6], packet[7]]);
    let body = &packet[8..];
    let body = &body[..body.iter().position(|&b| b == 0).unwrap_or(body.len())];
    RconPacket { id, kind, body: body.to_vec() }
}

fn unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_millis() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ports_are_seen_in_the_network_namespace_of_a_pid() {
        let me = std::process::id() as i64;
        let tcp = std::net::TcpListener::bind(("0.0.0.0", 0)).unwrap();
        let udp = std::net::UdpSocket::bind(("0.0.0.0", 0)).unwrap();
        let (tp, up) = (tcp.local_addr().unwrap().port(), udp.local_addr().unwrap().port());
        assert!(super::tcp_port_listening_in(me, tp));
        assert!(super::udp_port_bound_in(me, up));
        assert!(!super::tcp_port_listening_in(i64::from(i32::MAX), tp), "no such process, no ports");
        assert!(!super::udp_port_bound_in(i64::from(i32::MAX), up));
    }

    use super::*;

    const TCP_TABLE: &str = "\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:63DD 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 41234 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000  1000        0 41235 1 0000000000000000 20 4 30 10 -1
";

    const TCP6_TABLE: &str = "\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F41 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 20001 1 0000000000000000 100 0 0 10 0
";

    const UDP_TABLE: &str = "\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  255: 00000000:4A9B 00000000:0000 07 00000000:00000000 00:00000000 00000000   104        0 17923 2 0000000000000000 0
";

    #[test]
    fn finds_listening_tcp_port() {
        // 0x63DD = 25565
        assert!(proc_net_table_has_port(TCP_TABLE, 25565, Some(TCP_STATE_LISTEN)));
    }

    #[test]
    fn ignores_tcp_port_not_in_listen_state() {
        // 0x1F90 = 8080, but ESTABLISHED (01).
        assert!(!proc_net_table_has_port(TCP_TABLE, 8080, Some(TCP_STATE_LISTEN)));
        assert!(proc_net_table_has_port(TCP_TABLE, 8080, None));
    }

    #[test]
    fn does_not_match_remote_port() {
        // 0xC350 = 50000 appears only as a remote port.
        assert!(!proc_net_table_has_port(TCP_TABLE, 50000, None));
    }

    #[test]
    fn finds_listening_tcp6_port() {
        // 0x1F41 = 8001
        assert!(proc_net_table_has_port(TCP6_TABLE, 8001, Some(TCP_STATE_LISTEN)));
        assert!(!proc_net_table_has_port(TCP6_TABLE, 8000, Some(TCP_STATE_LISTEN)));
    }

    #[test]
    fn finds_bound_udp_port() {
        // 0x4A9B = 19099
        assert!(proc_net_table_has_port(UDP_TABLE, 19099, None));
        assert!(!proc_net_table_has_port(UDP_TABLE, 19098, None));
    }

    #[test]
    fn header_and_garbage_rows_never_match() {
        assert!(!proc_net_table_has_port("", 0, None));
        assert!(!proc_net_table_has_port("header\nnot a row\n   3: nocolon 0A\n", 0, None));
    }

    #[test]
    fn status_json_is_parsed() {
        let json = r#"{"version":{"name":"1.20.4","protocol":765},"players":{"max":20,"online":3,"sample":[]},"description":{"text":"hi"}}"#;
        let status = parse_status_json(json).unwrap();
        assert_eq!(status.version_name, "1.20.4");
        assert_eq!((status.protocol, status.max_players, status.online_players), (765, 20, 3));
    }

    #[test]
    fn status_json_missing_players_is_an_error() {
        let json = r#"{"version":{"name":"x","protocol":1}}"#;
        assert!(matches!(parse_status_json(json), Err(ProbeError::StatusField("/players/max"))));
    }

    #[test]
    fn varint_round_trips() {
        for value in [0, 1, 127, 128, 765, 25565, i32::MAX, -1, i32::MIN] {
            let mut bytes = Vec::new();
            write_varint(&mut bytes, value);
            let mut buffer = bytes.as_slice();
            assert_eq!(read_varint(&mut buffer).unwrap(), value);
            assert!(buffer.is_empty());
        }
    }

    #[test]
    fn absurd_frame_length_is_rejected() {
        assert!(matches!(checked_frame_length(2 * 1024 * 1024), Err(ProbeError::FrameLength(_))));
        assert!(matches!(checked_frame_length(-5), Err(ProbeError::FrameLength(-5))));
        assert_eq!(checked_frame_length(1024).unwrap(), 1024);
    }

    #[test]
    fn rcon_frame_round_trips() {
        let frame = rcon_frame(9, RCON_TYPE_COMMAND, b"list").unwrap();
        assert_eq!(&frame[..4], &14i32.to_le_bytes());
        let packet = parse_rcon_packet(&frame[4..]);
        assert_eq!((packet.id, packet.kind, packet.body.as_slice()), (9, 2, &b"list"[..]));
    }
}
