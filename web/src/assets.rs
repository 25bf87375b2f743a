//! The browser app, compiled into the binary: no runtime downloads, no CDN.

/// `(path, content type, body)` for every static file.
pub const ASSETS: &[(&str, &str, &str)] = &[
    ("/", "text/html; charset=utf-8", include_str!("../assets/index.html")),
    ("/app.js", "text/javascript; charset=utf-8", include_str!("../assets/app.js")),
    ("/app.css", "text/css; charset=utf-8", include_str!("../assets/app.css")),
];

pub fn find(path: &str) -> Option<(&'static str, &'static str)> {
    ASSETS.iter().find(|(p, _, _)| *p == path).map(|(_, kind, body)| (*kind, *body))
}
