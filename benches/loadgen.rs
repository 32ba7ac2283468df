//! The proxy benches' own load tools (benches/proxy_streams.sh, benches/proxy_rate.sh): a
//! streaming upstream, a client holding thousands of streams, and an open-loop client at a
//! fixed rate. Not a criterion bench: the scripts run its binary with a subcommand.
//!
//! ```text
//! loadgen sse-upstream --listen 127.0.0.1:18101 [--chunks 100] [--interval-ms 20] [--size 60]
//! loadgen sse-client --url http://127.0.0.1:18102/chat/completions --streams 1000
//!         [--duration 10] [--ramp-ms 1000] [--warmup-ms 2000] [--pids 123,456] [--also-pids 789]
//! loadgen rate --url http://127.0.0.1:18102/chat/completions --rate 5000
//!         [--duration 10] [--warmup-ms 2000] [--connections 32] [--pids ...] [--also-pids ...]
//! ```
//!
//! `sse-upstream` answers every request with a server-sent event stream: `--chunks` events
//! of `--size` bytes, `--interval-ms` apart, each carrying the wall-clock time it was
//! written (`"t":<ns since the epoch>`). `sse-client` keeps `--streams` connections, each
//! asking for one stream after another (POST of a small chat completion), and takes each
//! event's arrival time minus its `t`: the latency the path between the two processes
//! adds, through a proxy or not (the same clock on one machine). It reads the CPU time and
//! RSS of the processes `--pids` names at the start, in the middle (RSS: all streams
//! open) and at the end, and the share of the cores those, `--also-pids` (the upstream)
//! and itself took (`busy`: near 1, the machine is saturated by the benchmark itself). `rate` sends POSTs at a fixed rate whatever the answers do (open
//! loop, wrk2's way: request `i` belongs to connection `i % connections` and is due at
//! `start + i / rate`), and measures each from its write to the end of its answer; how
//! late the sends left is reported beside, so a client that fell behind shows.
//!
//! Each prints one line of `name=value` fields (for the scripts) after a readable summary.
//! Why our own rather than `oha --qps`: a few hundred lines on crates this workspace
//! already builds, the event timestamps need a client that reads them, and the pacing
//! here is a thread's sleep (~60 µs slack) rather than tokio's 1 ms timer wheel, which
//! would send 5 requests at once every millisecond at 5,000/s.
// A load tool times the real world, from a thread outside any runtime too: no test pauses
// its clock (clippy.toml bans `std::time::Instant` for the library's sake).
#![allow(clippy::disallowed_types)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// What `sse-client` asks for.
const POST_BODY: &str =
    r#"{"model":"glm-4-flash","stream":true,"messages":[{"role":"user","content":"Hello"}]}"#;
/// What `rate` asks for (wrk's body in the other proxy benches).
const CHAT_BODY: &str = r#"{"model":"glm-4-flash","messages":[{"role":"user","content":"Hello"}]}"#;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(command) = args.first().filter(|a| !a.starts_with('-')) else {
        // `cargo bench` runs every bench with `--bench`: nothing to measure here.
        eprintln!(
            "loadgen: a subcommand is needed (sse-upstream, sse-client, rate); see benches/loadgen.rs"
        );
        return;
    };
    let options = Options::parse(&args[1..]);
    let result = match command.as_str() {
        "sse-upstream" => runtime(options.int("threads", 1)).block_on(sse_upstream(options)),
        "sse-client" => runtime(options.int("threads", 1)).block_on(sse_client(options)),
        "rate" => rate(options),
        other => Err(format!("unknown subcommand {other}").into()),
    };
    if let Err(e) = result {
        eprintln!("loadgen {command}: {e}");
        std::process::exit(1);
    }
}

fn runtime(threads: u64) -> tokio::runtime::Runtime {
    let mut builder = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads as usize);
        b
    };
    builder.enable_all().build().expect("a tokio runtime")
}

/// `--name value` pairs.
struct Options(Vec<(String, String)>);

impl Options {
    fn parse(args: &[String]) -> Self {
        let mut pairs = Vec::new();
        let mut it = args.iter();
        while let Some(name) = it.next() {
            let Some(name) = name.strip_prefix("--") else {
                panic!("expected --name value, found {name}");
            };
            let value = it
                .next()
                .unwrap_or_else(|| panic!("--{name} needs a value"));
            pairs.push((name.to_owned(), value.clone()));
        }
        Self(pairs)
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn int(&self, name: &str, default: u64) -> u64 {
        self.get(name).map_or(default, |v| {
            v.parse()
                .unwrap_or_else(|_| panic!("--{name}: not a number: {v}"))
        })
    }

    fn required(&self, name: &str) -> &str {
        self.get(name)
            .unwrap_or_else(|| panic!("--{name} is required"))
    }
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_nanos() as u64
}

// --- the streaming upstream --------------------------------------------------------------

async fn sse_upstream(options: Options) -> Result<(), Error> {
    let listen: SocketAddr = options.required("listen").parse()?;
    let chunks = options.int("chunks", 100) as u32;
    let interval = Duration::from_millis(options.int("interval-ms", 20));
    let size = options.int("size", 60) as usize;
    let listener = TcpListener::bind(listen).await?;
    eprintln!("sse-upstream on {listen}: {chunks} events of {size} bytes, {interval:?} apart");
    loop {
        let (tcp, _) = listener.accept().await?;
        tcp.set_nodelay(true)?;
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |_req| async move {
                let body = Ticker::new(chunks, interval, size);
                Ok::<_, Infallible>(
                    hyper::Response::builder()
                        .header("content-type", "text/event-stream")
                        .header("cache-control", "no-cache")
                        .body(body)
                        .expect("a valid response"),
                )
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

/// A stream of `left` events, one per `interval`, each stamped when it is written.
struct Ticker {
    sleep: Pin<Box<tokio::time::Sleep>>,
    next: tokio::time::Instant,
    interval: Duration,
    sent: u32,
    chunks: u32,
    size: usize,
}

impl Ticker {
    fn new(chunks: u32, interval: Duration, size: usize) -> Self {
        let next = tokio::time::Instant::now() + interval;
        Self {
            sleep: Box::pin(tokio::time::sleep_until(next)),
            next,
            interval,
            sent: 0,
            chunks,
            size,
        }
    }
}

impl Body for Ticker {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.sent == this.chunks {
            return Poll::Ready(None);
        }
        std::task::ready!(this.sleep.as_mut().poll(cx));
        this.sent += 1;
        this.next += this.interval;
        this.sleep.as_mut().reset(this.next);
        let mut event = format!("data: {{\"t\":{},\"i\":{},\"c\":\"", unix_ns(), this.sent);
        let pad = this.size.saturating_sub(event.len() + 4);
        event.extend(std::iter::repeat_n('x', pad));
        event.push_str("\"}\n\n");
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(event)))))
    }

    fn is_end_stream(&self) -> bool {
        self.sent == self.chunks
    }
}

// --- the streaming client ----------------------------------------------------------------

/// Where to send: address, path and `Host`.
#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    path: String,
    host: String,
}

impl Target {
    fn parse(url: &str) -> Result<Self, Error> {
        let uri: hyper::Uri = url.parse()?;
        if uri.scheme_str() != Some("http") {
            return Err("only http:// URLs".into());
        }
        let host = uri.authority().ok_or("the URL has no host")?.to_string();
        let addr = host.parse().map_err(|_| "the URL's host must be IP:PORT")?;
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        Ok(Self { addr, path, host })
    }
}

/// User + system time (clock ticks) and RSS (KiB) of each of `pids`, summed.
fn cpu_and_rss(pids: &[u32]) -> (u64, u64) {
    let (mut ticks, mut rss) = (0, 0);
    for pid in pids {
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // The fields after the command's closing parenthesis: utime and stime are the
            // 12th and 13th of them.
            let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
            let fields: Vec<&str> = rest.split_whitespace().collect();
            ticks += fields
                .get(11)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            ticks += fields
                .get(12)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            rss += status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    (ticks, rss)
}

/// The share of the machine's cores that `pids` and this process took over `elapsed`:
/// near 1.0, the benchmark's own processes saturate the machine, and latency measures
/// their queueing for a core rather than the path.
fn cpu_share(pids: &[u32], start_ticks: u64, elapsed: Duration) -> f64 {
    let (ticks, _) = cpu_and_rss(pids);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let seconds = ticks.saturating_sub(start_ticks) as f64 / clock_ticks_per_s() as f64;
    seconds / (elapsed.as_secs_f64() * cores)
}

/// `--pids` and `--also-pids` (the upstream: counted in the CPU share only) and this
/// process.
fn all_pids(options: &Options, pids: &[u32]) -> Vec<u32> {
    let mut all = pids.to_vec();
    all.extend(parse_pids(options.get("also-pids")));
    all.push(std::process::id());
    all
}

fn parse_pids(list: Option<&str>) -> Vec<u32> {
    list.unwrap_or("")
        .split(',')
        .filter_map(|p| p.trim().parse().ok())
        .collect()
}

fn clock_ticks_per_s() -> u64 {
    // getconf CLK_TCK is 100 on every Linux this runs on; the scripts may say otherwise.
    std::env::var("CLK_TCK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}

struct StreamStats {
    latencies_ns: Vec<u32>,
    events: u64,
    streams: u64,
    errors: u64,
}

async fn sse_client(options: Options) -> Result<(), Error> {
    let target = Target::parse(options.required("url"))?;
    let streams = options.int("streams", 1000) as usize;
    let duration = Duration::from_secs(options.int("duration", 10));
    let ramp = Duration::from_millis(options.int("ramp-ms", 1000));
    let warmup = Duration::from_millis(options.int("warmup-ms", 2000));
    let pids = parse_pids(options.get("pids"));
    let everyone = all_pids(&options, &pids);

    let (ticks_start, rss_start) = cpu_and_rss(&pids);
    let (everyone_start, _) = cpu_and_rss(&everyone);
    let start = Instant::now();
    let until = start + duration;
    let measure_from = unix_ns() + warmup.as_nanos() as u64;
    let open = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::with_capacity(streams);
    for i in 0..streams {
        let target = target.clone();
        let open = open.clone();
        let delay = ramp * i as u32 / streams.max(1) as u32;
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            one_connection(target, until, measure_from, open).await
        }));
    }
    // The middle of the run: every stream open (in turn, back to back).
    tokio::time::sleep(ramp + (duration.saturating_sub(ramp)) / 2).await;
    let open_at_middle = open.load(Ordering::Relaxed);
    let (_, rss_open) = cpu_and_rss(&pids);

    let mut all = StreamStats {
        latencies_ns: Vec::new(),
        events: 0,
        streams: 0,
        errors: 0,
    };
    for task in tasks {
        let stats = task.await?;
        all.latencies_ns.extend_from_slice(&stats.latencies_ns);
        all.events += stats.events;
        all.streams += stats.streams;
        all.errors += stats.errors;
    }
    let elapsed = start.elapsed();
    let (ticks_end, _) = cpu_and_rss(&pids);
    let busy = cpu_share(&everyone, everyone_start, elapsed);
    all.latencies_ns.sort_unstable();
    let pct = |p: f64| percentile_us(&all.latencies_ns, p);
    let cpu_us = (ticks_end - ticks_start) as f64 * 1e6 / clock_ticks_per_s() as f64;
    let per_event = if all.events > 0 {
        cpu_us / all.events as f64
    } else {
        0.0
    };
    let rss_per_stream = (rss_open as f64 - rss_start as f64) / open_at_middle.max(1) as f64;
    eprintln!(
        "{streams} connections for {:.1} s: {} streams, {} events ({:.0}/s), {} errors; \
         latency p50 {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs, max {:.1} µs; CPU of pids \
         {:.2} µs/event; RSS {} → {} KiB with {open_at_middle} streams open; the \
         benchmark's processes took {:.0} % of the cores",
        elapsed.as_secs_f64(),
        all.streams,
        all.events,
        all.events as f64 / elapsed.as_secs_f64(),
        all.errors,
        pct(0.50),
        pct(0.99),
        pct(0.999),
        pct(1.0),
        per_event,
        rss_start,
        rss_open,
        busy * 100.0,
    );
    println!(
        "streams={streams} open={open_at_middle} events={} errors={} p50_us={:.1} p90_us={:.1} \
         p99_us={:.1} p999_us={:.1} cpu_us_per_event={per_event:.3} rss_start_kib={rss_start} \
         rss_open_kib={rss_open} rss_per_stream_kib={rss_per_stream:.2} busy={busy:.2} \
         seconds={:.2}",
        all.events,
        all.errors,
        pct(0.50),
        pct(0.90),
        pct(0.99),
        pct(0.999),
        elapsed.as_secs_f64(),
    );
    Ok(())
}

/// One client connection asking for streams back to back until `until`. A plain socket
/// rather than hyper's client: one task and one read per event, so that the client's own
/// scheduling adds as little as it can to what it measures (hyper's connection task and
/// body channel added milliseconds at 1,000 streams on one thread). It expects what
/// every target here sends: a 200 head, then a chunked body of `\n\n`-ended events.
async fn one_connection(
    target: Target,
    until: Instant,
    measure_from: u64,
    open: Arc<AtomicUsize>,
) -> StreamStats {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut stats = StreamStats {
        latencies_ns: Vec::new(),
        events: 0,
        streams: 0,
        errors: 0,
    };
    let request = format!(
        "POST {} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\naccept: \
         text/event-stream\r\ncontent-length: {}\r\n\r\n{POST_BODY}",
        target.path,
        target.host,
        POST_BODY.len()
    );
    let mut tcp: Option<TcpStream> = None;
    let mut counted_open = false;
    let mut buf = BytesMut::with_capacity(4096);
    'streams: while Instant::now() < until {
        let stream = match &mut tcp {
            Some(stream) => stream,
            None => match TcpStream::connect(target.addr).await {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    tcp.insert(stream)
                }
                Err(_) => {
                    stats.errors += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        if stream.write_all(request.as_bytes()).await.is_err() {
            tcp = None;
            stats.errors += 1;
            continue;
        }
        buf.clear();
        let mut in_body = false;
        loop {
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => {
                    tcp = None;
                    stats.errors += 1;
                    continue 'streams;
                }
                Ok(_) => {}
            }
            let now = unix_ns();
            if !in_body {
                let Some(end) = find(&buf, b"\r\n\r\n") else {
                    continue;
                };
                if !buf.starts_with(b"HTTP/1.1 200") {
                    tcp = None;
                    stats.errors += 1;
                    continue 'streams;
                }
                let _ = buf.split_to(end + 4);
                in_body = true;
                if !counted_open {
                    open.fetch_add(1, Ordering::Relaxed);
                    counted_open = true;
                }
            }
            while let Some(end) = find(&buf, b"\n\n") {
                let event = buf.split_to(end + 2);
                stats.events += 1;
                if let Some(sent) = stamp(&event)
                    && sent >= measure_from
                {
                    let latency = now.saturating_sub(sent).min(u64::from(u32::MAX)) as u32;
                    stats.latencies_ns.push(latency);
                }
            }
            // The last chunk (`0`), after the last event's chunk.
            if buf.ends_with(b"0\r\n\r\n") {
                stats.streams += 1;
                continue 'streams;
            }
        }
    }
    if counted_open {
        open.fetch_sub(1, Ordering::Relaxed);
    }
    stats
}

/// The `content-length` of a response head.
fn content_length(head: &[u8]) -> Option<usize> {
    let head = std::str::from_utf8(head).ok()?;
    head.split("\r\n").find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse().ok())?
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The `"t":<digits>` of an event.
fn stamp(event: &[u8]) -> Option<u64> {
    let at = event.windows(4).position(|w| w == b"\"t\":")? + 4;
    let digits = event[at..].iter().take_while(|b| b.is_ascii_digit());
    let mut value = 0u64;
    let mut any = false;
    for b in digits {
        value = value * 10 + u64::from(b - b'0');
        any = true;
    }
    any.then_some(value)
}

fn percentile_us(sorted_ns: &[u32], p: f64) -> f64 {
    if sorted_ns.is_empty() {
        return 0.0;
    }
    let index = ((sorted_ns.len() as f64 * p).ceil() as usize).clamp(1, sorted_ns.len()) - 1;
    f64::from(sorted_ns[index]) / 1000.0
}

// --- the open-loop client ----------------------------------------------------------------

fn rate(options: Options) -> Result<(), Error> {
    let target = Target::parse(options.required("url"))?;
    let rate = options.int("rate", 5000).max(1);
    let duration = Duration::from_secs(options.int("duration", 10));
    let warmup = Duration::from_millis(options.int("warmup-ms", 2000));
    let connections = options.int("connections", 32).max(1) as usize;
    // Worker threads of their own: this thread paces.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(options.int("threads", 1).max(1) as usize)
        .enable_all()
        .build()?;
    let everyone = all_pids(&options, &parse_pids(options.get("pids")));

    let period = Duration::from_nanos(1_000_000_000 / rate);
    let total = (duration.as_nanos() / period.as_nanos()) as usize;
    let start = Instant::now() + Duration::from_millis(200);
    let measure_from = start + warmup;
    let errors = Arc::new(AtomicU64::new(0));

    let mut queues = Vec::with_capacity(connections);
    let mut tasks = Vec::with_capacity(connections);
    for _ in 0..connections {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        queues.push(tx);
        let target = target.clone();
        let errors = errors.clone();
        tasks.push(runtime.spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};

            let request = format!(
                "POST {} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\n\r\n{CHAT_BODY}",
                target.path,
                target.host,
                CHAT_BODY.len()
            );
            let mut latencies = Vec::new();
            let mut lateness = Vec::new();
            let mut tcp: Option<TcpStream> = None;
            let mut buf = BytesMut::with_capacity(4096);
            while let Some(due) = rx.recv().await {
                if tcp.is_none() {
                    tcp = TcpStream::connect(target.addr).await.ok();
                    if let Some(stream) = &tcp {
                        let _ = stream.set_nodelay(true);
                    }
                }
                let Some(stream) = tcp.as_mut() else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let sent = Instant::now();
                let ok = exchange(stream, request.as_bytes(), &mut buf).await;
                let done = Instant::now();
                if !ok {
                    errors.fetch_add(1, Ordering::Relaxed);
                    tcp = None;
                    continue;
                }
                if due >= measure_from {
                    latencies.push((done - sent).as_nanos().min(u128::from(u32::MAX)) as u32);
                    lateness.push(sent.saturating_duration_since(due).as_nanos() as u32);
                }
            }

            /// Writes `request`, reads a 200 answer with a `content-length` body.
            async fn exchange(stream: &mut TcpStream, request: &[u8], buf: &mut BytesMut) -> bool {
                if stream.write_all(request).await.is_err() {
                    return false;
                }
                buf.clear();
                loop {
                    match stream.read_buf(buf).await {
                        Ok(0) | Err(_) => return false,
                        Ok(_) => {}
                    }
                    let Some(end) = find(buf, b"\r\n\r\n") else {
                        continue;
                    };
                    let Some(length) = content_length(&buf[..end]) else {
                        return false;
                    };
                    while buf.len() < end + 4 + length {
                        match stream.read_buf(buf).await {
                            Ok(0) | Err(_) => return false,
                            Ok(_) => {}
                        }
                    }
                    return buf.starts_with(b"HTTP/1.1 200");
                }
            }
            (latencies, lateness)
        }));
    }

    let (everyone_start, _) = cpu_and_rss(&everyone);
    let machine_start = Instant::now();
    // The pacer: a thread of its own, sleeping until each request is due.
    for i in 0..total {
        let due = start + period * i as u32;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        if queues[i % connections].send(due).is_err() {
            errors.fetch_add(1, Ordering::Relaxed);
        }
    }
    drop(queues);
    let (mut latencies, mut lateness) = (Vec::new(), Vec::new());
    for task in tasks {
        let (l, late) = runtime.block_on(task)?;
        latencies.extend(l);
        lateness.extend(late);
    }
    let elapsed = start.elapsed();
    let busy = cpu_share(&everyone, everyone_start, machine_start.elapsed());
    latencies.sort_unstable();
    lateness.sort_unstable();
    let errors = errors.load(Ordering::Relaxed);
    let p = |p: f64| percentile_us(&latencies, p);
    let late = |p: f64| percentile_us(&lateness, p);
    eprintln!(
        "{total} requests due at {rate}/s over {connections} connections ({:.1} s), {} measured, \
         {errors} errors: latency p50 {:.1} µs, p90 {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs, \
         max {:.1} µs; sends left late by p50 {:.1} µs, p99 {:.1} µs",
        elapsed.as_secs_f64(),
        latencies.len(),
        p(0.5),
        p(0.9),
        p(0.99),
        p(0.999),
        p(1.0),
        late(0.5),
        late(0.99),
    );
    println!(
        "rate={rate} requests={total} measured={} errors={errors} p50_us={:.1} p90_us={:.1} \
         p99_us={:.1} p999_us={:.1} late_p50_us={:.1} late_p99_us={:.1} busy={busy:.2} \
         seconds={:.2}",
        latencies.len(),
        p(0.5),
        p(0.9),
        p(0.99),
        p(0.999),
        late(0.5),
        late(0.99),
        elapsed.as_secs_f64(),
    );
    Ok(())
}
