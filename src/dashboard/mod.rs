//! The dashboard (`GET /`): one page and its script and style sheet, embedded in the
//! binary so that it works on a GPU box without network. No build step: plain HTML, CSS
//! and JavaScript (see `app.js` for what it draws and where its data comes from).

use warp::reply::{Reply, Response};
use warp::{Filter, Rejection};

const INDEX_HTML: &str = include_str!("index.html");
const APP_JS: &str = include_str!("app.js");
const STYLE_CSS: &str = include_str!("style.css");

/// Scripts and styles only from this daemon, no inline script, no framing, requests only
/// back to this daemon.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// `GET /`, `GET /dashboard/app.js`, `GET /dashboard/style.css`.
pub fn routes() -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let page = warp::path::end()
        .and(warp::get())
        .map(|| asset(INDEX_HTML, "text/html; charset=utf-8"));
    let script = warp::path!("dashboard" / "app.js")
        .and(warp::get())
        .map(|| asset(APP_JS, "text/javascript; charset=utf-8"));
    let style = warp::path!("dashboard" / "style.css")
        .and(warp::get())
        .map(|| asset(STYLE_CSS, "text/css; charset=utf-8"));
    page.or(script).unify().or(style).unify()
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    for (name, value) in [
        ("content-type", content_type),
        ("content-security-policy", CONTENT_SECURITY_POLICY),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
        // A new binary may carry a new page: the browser asks again each time.
        ("cache-control", "no-cache"),
    ] {
        headers.insert(name, warp::http::HeaderValue::from_static(value));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_page_loads_its_own_script_and_style_under_a_strict_policy() {
        let routes = routes();
        let page = warp::test::request().path("/").reply(&routes).await;
        assert_eq!(page.status(), 200);
        assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
        let csp = page.headers()["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("script-src 'self';"), "{csp}");
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        assert!(page.headers().get("access-control-allow-origin").is_none());
        let html = std::str::from_utf8(page.body()).unwrap();
        assert!(html.contains(r#"<script src="/dashboard/app.js" defer></script>"#));
        assert!(html.contains(r#"href="/dashboard/style.css""#));
        // No inline script, no style attribute, nothing fetched from elsewhere.
        assert!(
            !html.contains("<script>") && !html.contains("style="),
            "{html}"
        );
        for text in [INDEX_HTML, APP_JS, STYLE_CSS] {
            let text = text.replace("http://www.w3.org/2000/svg", "");
            assert!(!text.contains("http://") && !text.contains("https://"));
        }
        for (path, content_type) in [
            ("/dashboard/app.js", "text/javascript; charset=utf-8"),
            ("/dashboard/style.css", "text/css; charset=utf-8"),
        ] {
            let reply = warp::test::request().path(path).reply(&routes).await;
            assert_eq!(reply.status(), 200, "{path}");
            assert_eq!(reply.headers()["content-type"], content_type);
        }
    }
}
