//! The response body type every handler returns, the plain-text responses they share, and
//! the static site (`GET /` answers `Hello SRE!`) served by both `serve` and `backend`.

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use http::{HeaderMap, Method, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};

/// Errors a response body may end with.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The response body of every handler.
pub(crate) type Body = BoxBody<Bytes, BoxError>;

/// The static answer of `GET /`.
pub(crate) const HELLO: &str = "Hello SRE!";
const TEXT_PLAIN: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");
/// Fields of the largest answer: content type and length, allow, five security fields.
const RESPONSE_FIELDS: usize = 8;

/// A body holding `bytes`.
pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// `GET /`'s answer with its head cloned from `head` ([`hello_head`] plus the caller's
/// fields): a clone costs less than inserting the fields one by one on every request.
pub(crate) fn hello(head: &HeaderMap) -> Response<Body> {
    let mut response = Response::new(full(HELLO));
    *response.headers_mut() = head.clone();
    response
}

/// The fields of `GET /`'s answer: type and length (hyper need not add the length).
pub(crate) fn hello_head() -> HeaderMap {
    let mut head = HeaderMap::with_capacity(RESPONSE_FIELDS);
    head.insert(CONTENT_TYPE, TEXT_PLAIN);
    head.insert(CONTENT_LENGTH, HeaderValue::from(HELLO.len()));
    head
}

/// An empty body.
pub(crate) fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A `text/plain` response; the message ends with a newline unless it is the hello body.
pub(crate) fn text(status: StatusCode, message: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(full(message));
    *response.status_mut() = status;
    // Room for every field an answer gets (the security fields of HTTPS, hyper's
    // content-length) without the map growing twice on the way.
    *response.headers_mut() = HeaderMap::with_capacity(RESPONSE_FIELDS);
    response.headers_mut().insert(CONTENT_TYPE, TEXT_PLAIN);
    response
}

/// The static site: `GET`/`HEAD /` say hello; other paths 404; other methods 405.
pub(crate) fn static_site(method: &Method, path: &str) -> Response<Body> {
    if path != "/" {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    match *method {
        Method::GET => text(StatusCode::OK, HELLO),
        Method::HEAD => {
            let mut response = text(StatusCode::OK, Bytes::new());
            *response.body_mut() = empty();
            response
                .headers_mut()
                .insert(CONTENT_LENGTH, HeaderValue::from(HELLO.len()));
            response
        }
        _ => {
            let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(method: Method, path: &str, status: StatusCode, body: &str) {
        let response = static_site(&method, path);
        assert_eq!(response.status(), status, "{method} {path}");
        assert_eq!(
            response.headers()[CONTENT_TYPE],
            "text/plain; charset=utf-8"
        );
        let bytes = futures_lite_collect(response.into_body());
        assert_eq!(bytes, body.as_bytes(), "{method} {path}");
    }

    fn futures_lite_collect(body: Body) -> Vec<u8> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        runtime.block_on(async { body.collect().await.expect("body").to_bytes().to_vec() })
    }

    #[test]
    fn static_site_routes() {
        check(Method::GET, "/", StatusCode::OK, "Hello SRE!");
        check(Method::HEAD, "/", StatusCode::OK, "");
        check(Method::GET, "/nope", StatusCode::NOT_FOUND, "not found\n");
        check(
            Method::POST,
            "/",
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n",
        );
        assert_eq!(
            static_site(&Method::DELETE, "/").headers()[ALLOW],
            "GET, HEAD"
        );
        assert_eq!(
            static_site(&Method::HEAD, "/").headers()[CONTENT_LENGTH],
            "10"
        );
    }

    #[test]
    fn the_prebuilt_hello_is_the_static_sites() {
        let prebuilt = hello(&hello_head());
        let built = static_site(&Method::GET, "/");
        assert_eq!(prebuilt.status(), built.status());
        assert_eq!(
            prebuilt.headers()[CONTENT_TYPE],
            built.headers()[CONTENT_TYPE]
        );
        assert_eq!(prebuilt.headers()[CONTENT_LENGTH], "10");
        assert_eq!(futures_lite_collect(prebuilt.into_body()), HELLO.as_bytes());
    }
}
