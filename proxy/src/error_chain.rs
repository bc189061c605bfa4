//! An error with its causes on one line (`outer: inner: root`), as operators read it in a
//! log line; `Display` alone would hide the cause that says what to do.

use std::error::Error;

/// `error` followed by each of its sources, separated by `: `.
pub(crate) fn error_chain(error: &(dyn Error + 'static)) -> String {
    let mut text = String::new();
    for (i, cause) in causes(error).enumerate() {
        if i > 0 {
            text.push_str(": ");
        }
        text.push_str(&cause.to_string());
    }
    text
}

/// The innermost cause of `error`: often the operating system's answer (an errno), which
/// the outer messages name only as "failed to ...".
pub(crate) fn root_cause(error: &(dyn Error + 'static)) -> String {
    causes(error).last().unwrap_or(error).to_string()
}

/// `error` and each of its sources, outermost first.
pub(crate) fn causes<'a>(
    error: &'a (dyn Error + 'static),
) -> impl Iterator<Item = &'a (dyn Error + 'static)> {
    std::iter::successors(Some(error), |&e| e.source())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("attaching the tracepoint")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn shows_every_cause() {
        let error = Outer(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "permission denied",
        ));
        assert_eq!(
            error_chain(&error),
            "attaching the tracepoint: permission denied"
        );
        assert_eq!(root_cause(&error), "permission denied");
        assert_eq!(root_cause(&std::io::Error::other("no cause")), "no cause");
    }
}
