//! HTTP/1.x spoken by hand over any byte stream: requests written exactly as given (malformed
//! ones included) and responses, requests and connection closes read without a library.

use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::CLIENT_TIMEOUT;

/// A response read off the wire by hand.
#[derive(Clone, Debug)]
pub struct RawResp {
    /// Status code.
    pub status: u16,
    /// The status line and headers as received.
    pub head: String,
    /// Headers with lowercased names, in order.
    pub headers: Vec<(String, String)>,
    /// The body (de-chunked).
    pub body: Vec<u8>,
}

impl RawResp {
    /// The first header with this (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Connects to `addr`, writes `request` exactly, and reads one response.
pub async fn raw_http(addr: &str, request: &[u8]) -> Result<RawResp, String> {
    timeout(CLIENT_TIMEOUT, async {
        let mut tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("TCP connect to {addr}: {e}"))?;
        tcp.write_all(request)
            .await
            .map_err(|e| format!("writing the request: {e}"))?;
        read_response_for(&mut tcp, request.starts_with(b"HEAD ")).await
    })
    .await
    .map_err(|_| format!("no complete response from {addr} within {CLIENT_TIMEOUT:?}"))?
}

/// Reads one HTTP/1.x response (head, then a Content-Length, chunked or until-EOF body).
pub async fn read_response<S: AsyncRead + Unpin>(s: &mut S) -> Result<RawResp, String> {
    read_response_for(s, false).await
}

/// Like [`read_response`]; a response to HEAD has no body whatever its headers say.
pub async fn read_response_for<S: AsyncRead + Unpin>(
    s: &mut S,
    head_request: bool,
) -> Result<RawResp, String> {
    let (head, headers, rest) = read_head(s).await?;
    let status_line = head.lines().next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut resp = RawResp {
        status,
        head,
        headers,
        body: Vec::new(),
    };
    let bodiless = head_request || status == 204 || status == 304 || (100..200).contains(&status);
    if !bodiless {
        resp.body = read_body(s, &resp, rest, true).await?;
    }
    Ok(resp)
}

/// Reads one HTTP/1.x request as a server would: head, then a Content-Length or chunked body.
/// `status` is 0 and `head` holds the request line and headers.
pub async fn read_request<S: AsyncRead + Unpin>(s: &mut S) -> Result<RawResp, String> {
    let (head, headers, rest) = read_head(s).await?;
    let mut req = RawResp {
        status: 0,
        head,
        headers,
        body: Vec::new(),
    };
    req.body = read_body(s, &req, rest, false).await?;
    Ok(req)
}

/// Reads up to the blank line; returns the head text, lowercased headers and the bytes after.
async fn read_head<S: AsyncRead + Unpin>(
    s: &mut S,
) -> Result<(String, Vec<(String, String)>, Vec<u8>), String> {
    let mut buf = Vec::new();
    let head_len = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        if fill(s, &mut buf).await? == 0 {
            return Err(format!(
                "connection closed before a complete head (got {:?})",
                String::from_utf8_lossy(&buf)
            ));
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
    let headers = head
        .split("\r\n")
        .skip(1)
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let rest = buf.split_off(head_len);
    Ok((head, headers, rest))
}

/// Reads a chunked or Content-Length body; without either, until EOF if `until_eof`, else none.
async fn read_body<S: AsyncRead + Unpin>(
    s: &mut S,
    msg: &RawResp,
    mut rest: Vec<u8>,
    until_eof: bool,
) -> Result<Vec<u8>, String> {
    if msg
        .header("transfer-encoding")
        .is_some_and(|te| te.eq_ignore_ascii_case("chunked"))
    {
        read_chunked(s, rest).await
    } else if let Some(len) = msg.header("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| format!("bad Content-Length {len:?}"))?;
        while rest.len() < len {
            if fill(s, &mut rest).await? == 0 {
                return Err(format!("body cut short at {} of {len} bytes", rest.len()));
            }
        }
        rest.truncate(len);
        Ok(rest)
    } else if until_eof {
        while fill(s, &mut rest).await? > 0 {}
        Ok(rest)
    } else {
        Ok(Vec::new())
    }
}

/// Reads until the peer closes (EOF or error) and returns how long that took from `since`;
/// `Err` with what was seen if still open after `limit`.
pub async fn wait_closed<S: AsyncRead + Unpin>(
    s: &mut S,
    since: Instant,
    limit: Duration,
) -> Result<Duration, String> {
    let mut seen = 0usize;
    let mut chunk = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(since.elapsed());
        match timeout(left, s.read(&mut chunk)).await {
            Err(_) => {
                return Err(format!(
                    "still open after {limit:?} (received {seen} bytes meanwhile)"
                ));
            }
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(since.elapsed()),
            Ok(Ok(n)) => seen += n,
        }
    }
}

async fn read_chunked<S: AsyncRead + Unpin>(
    s: &mut S,
    mut buf: Vec<u8>,
) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(i) = find(&buf, b"\r\n") {
                break i;
            }
            if fill(s, &mut buf).await? == 0 {
                return Err("connection closed inside a chunk size line".into());
            }
        };
        let size_text = String::from_utf8_lossy(&buf[..line_end]).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        buf.drain(..line_end + 2);
        if size == 0 {
            return Ok(body);
        }
        while buf.len() < size + 2 {
            if fill(s, &mut buf).await? == 0 {
                return Err("connection closed inside a chunk".into());
            }
        }
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
    }
}

async fn fill<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> Result<usize, String> {
    let mut chunk = [0u8; 8192];
    let n = s
        .read(&mut chunk)
        .await
        .map_err(|e| format!("reading the response: {e}"))?;
    buf.extend_from_slice(&chunk[..n]);
    if buf.len() > 4 << 20 {
        return Err("response larger than 4 MiB".into());
    }
    Ok(n)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
