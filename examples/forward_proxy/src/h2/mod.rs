//! HTTP/2, on hyper: the proxy's clients that speak it (`server`), and the upstream's
//! connection when it offers it (`client`).

pub(crate) mod client;
pub(crate) mod server;
