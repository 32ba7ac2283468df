//! The server over in-memory connections: pipelining, a client gone, timeouts, stop,
//! request bodies.

use std::convert::Infallible;

use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, DuplexStream};

use super::*;

fn config() -> Config {
    Config {
        header_read_timeout: Duration::from_secs(5),
        half_close: false,
    }
}

/// Serves `server` with a handler answering `<method> <path> <body length>`.
fn echo(server: DuplexStream, config: Config) -> tokio::task::JoinHandle<io::Result<()>> {
    let (stop, stopping) = watch::channel(false);
    let task = echo_with(server, config, stopping);
    tokio::spawn(async move {
        let _stop = stop;
        task.await.unwrap()
    })
}

fn echo_with(
    server: DuplexStream,
    config: Config,
    stopping: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<io::Result<()>> {
    tokio::spawn(async move {
        let handler = |req: Request<ReceivedBody>| async move {
            let (parts, body) = req.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let text = format!("{} {} {}", parts.method, parts.uri, body.len());
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
        };
        serve(server, config, stopping, handler).await.map(|_| ())
    })
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let (mut client, server) = tokio::io::duplex(1 << 16);
    let task = echo(
        server,
        Config {
            half_close: true,
            ..config()
        },
    );
    client
        .write_all(
            b"POST /a HTTP/1.1\r\ncontent-length: 2\r\n\r\nhiGET /b HTTP/1.1\r\n\r\n\
              GET /c HTTP/1.1\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    client.shutdown().await.unwrap();
    let mut answer = String::new();
    client.read_to_string(&mut answer).await.unwrap();
    task.await.unwrap().unwrap();
    let bodies: Vec<&str> = answer
        .split("HTTP/1.1 200 OK\r\n")
        .skip(1)
        .map(|a| a.split("\r\n\r\n").nth(1).unwrap())
        .collect();
    assert_eq!(bodies, ["POST /a 2", "GET /b 0", "GET /c 0"], "{answer}");
}

#[tokio::test]
async fn a_client_gone_while_its_request_is_handled_drops_the_handler() {
    let (mut client, server) = tokio::io::duplex(1 << 16);
    let (dropped_tx, dropped) = tokio::sync::oneshot::channel::<()>();
    let (_stop, stopping) = watch::channel(false);
    let mut guard = Some(dropped_tx);
    let task = tokio::spawn(async move {
        let handler = move |_req: Request<ReceivedBody>| {
            let guard = guard.take();
            async move {
                let _guard = guard;
                std::future::pending::<Result<Response<Full<Bytes>>, Infallible>>().await
            }
        };
        serve(server, config(), stopping, handler).await.map(|_| ())
    });
    client
        .write_all(b"POST /a HTTP/1.1\r\ncontent-length: 2\r\n\r\nhi")
        .await
        .unwrap();
    tokio::task::yield_now().await;
    drop(client);
    // The handler's future (holding the sender) is dropped: the receiver sees it.
    assert!(dropped.await.is_err());
    assert!(task.await.unwrap().is_err());
}

#[tokio::test(start_paused = true)]
async fn a_head_not_finished_within_the_timeout_closes_the_connection() {
    let (mut client, server) = tokio::io::duplex(1 << 16);
    let task = echo(server, config());
    client
        .write_all(b"GET / HTTP/1.1\r\nhost: a\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    client.read_to_end(&mut answer).await.unwrap();
    assert!(answer.is_empty());
    assert!(started.elapsed() >= Duration::from_secs(5));
    task.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_timeout_counts_from_each_head_not_from_the_connection() {
    let (mut client, server) = tokio::io::duplex(1 << 16);
    let task = echo(server, config());
    // Requests every 3 s for 12 s: each head is on time, so none is cut.
    let mut buf = vec![0u8; 4096];
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_secs(3)).await;
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let n = client.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200 OK\r\n"));
    }
    // Then idle: closed 5 s after the last answer.
    let n = client.read(&mut buf).await.unwrap();
    assert_eq!(n, 0);
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn on_stop_an_idle_connection_closes_and_a_request_in_flight_is_answered_with_close() {
    let (stop, stopping) = watch::channel(false);
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let mut released = Some(released);
    let (mut busy, server) = tokio::io::duplex(1 << 16);
    let handler = move |_req: Request<ReceivedBody>| {
        let released = released.take();
        async move {
            if let Some(released) = released {
                let _ = released.await;
            }
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"done"))))
        }
    };
    let busy_task = tokio::spawn(serve(server, config(), stopping.clone(), handler));
    let (mut idle, server) = tokio::io::duplex(1 << 16);
    let idle_task = echo_with(server, config(), stopping);
    // The idle one has served a request and waits for the next.
    idle.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(idle.read(&mut buf).await.unwrap() > 0);
    busy.write_all(b"GET /slow HTTP/1.1\r\n\r\n").await.unwrap();
    tokio::task::yield_now().await;

    stop.send(true).unwrap();
    assert_eq!(
        idle.read(&mut buf).await.unwrap(),
        0,
        "the idle one is closed"
    );
    idle_task.await.unwrap().unwrap();
    release.send(()).unwrap();
    let mut answer = String::new();
    busy.read_to_string(&mut answer).await.unwrap();
    assert!(answer.contains("connection: close\r\n"), "{answer}");
    assert!(answer.ends_with("done"), "{answer}");
    assert!(busy_task.await.unwrap().is_ok());
}

#[tokio::test]
async fn a_body_read_to_its_length_in_pieces_keeps_the_connection() {
    let (mut client, server) = tokio::io::duplex(1 << 16);
    let (_stop, stopping) = watch::channel(false);
    // Reads frames up to the declared length, never asks for the end, drops the body.
    let handler = |req: Request<ReceivedBody>| async move {
        let (parts, mut body) = req.into_parts();
        let len: usize = parts
            .headers
            .get("content-length")
            .map_or(0, |v| v.to_str().unwrap().parse().unwrap());
        let mut read = 0;
        while read < len {
            let frame = body.frame().await.unwrap().unwrap();
            read += frame.into_data().unwrap().len();
        }
        drop(body);
        let text = format!("{} {read}", parts.uri);
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
    };
    let task = tokio::spawn(serve(server, config(), stopping, handler));
    client
        .write_all(b"POST /a HTTP/1.1\r\ncontent-length: 6\r\n\r\nab")
        .await
        .unwrap();
    tokio::task::yield_now().await;
    client.write_all(b"cd").await.unwrap();
    tokio::task::yield_now().await;
    client
        .write_all(b"efGET /b HTTP/1.1\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    client.read_to_string(&mut answer).await.unwrap();
    assert!(!answer.contains("connection: close\r\n\r\n/a"), "{answer}");
    assert!(answer.contains("\r\n\r\n/a 6HTTP/1.1 200 OK"), "{answer}");
    assert!(answer.ends_with("/b 0"), "{answer}");
    assert!(task.await.unwrap().is_ok());
}

#[tokio::test]
async fn expect_continue_is_answered_when_the_handler_reads_the_body() {
    let (mut client, server) = tokio::io::duplex(1 << 16);
    let task = echo(server, config());
    client
        .write_all(b"PUT /e HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 3\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = client.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"HTTP/1.1 100 Continue\r\n\r\n");
    client.write_all(b"abc").await.unwrap();
    let n = client.read(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.ends_with("PUT /e 3"), "{text}");
    drop(client);
    let _ = task.await.unwrap();
}
