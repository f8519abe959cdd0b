//! SVG charts a person can open in a browser: throughput and p99 against concurrency, and
//! throughput and p99 over time.

use crate::report::Report;

fn polyline(points: &[(f64, f64)], x_max: f64, y_max: f64, colour: &str) -> String {
    let (w, h, m) = (640.0, 320.0, 50.0);
    let pts: Vec<String> = points
        .iter()
        .map(|&(x, y)| {
            let px = m + x / x_max.max(1e-9) * (w - 2.0 * m);
            let py = h - m - y / y_max.max(1e-9) * (h - 2.0 * m);
            format!("{px:.1},{py:.1}")
        })
        .collect();
    let dots: String = pts
        .iter()
        .map(|p| {
            let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
            format!("<circle cx=\"{x}\" cy=\"{y}\" r=\"3\" fill=\"{colour}\"/>")
        })
        .collect();
    format!(
        "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>{dots}",
        pts.join(" ")
    )
}

/// A chart of two series sharing an x axis, each scaled to its own maximum.
pub fn chart(
    title: &str,
    x_label: &str,
    a: (&str, &[(f64, f64)]),
    b: (&str, &[(f64, f64)]),
) -> String {
    let x_max = a.1.iter().chain(b.1).map(|p| p.0).fold(0.0, f64::max);
    let a_max = a.1.iter().map(|p| p.1).fold(0.0, f64::max) * 1.1;
    let b_max = b.1.iter().map(|p| p.1).fold(0.0, f64::max) * 1.1;
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="640" height="340" font-family="sans-serif" font-size="12">
<rect width="640" height="340" fill="white"/>
<text x="320" y="20" text-anchor="middle" font-size="14">{title}</text>
<line x1="50" y1="270" x2="590" y2="270" stroke="#444"/><line x1="50" y1="50" x2="50" y2="270" stroke="#444"/>
<line x1="590" y1="50" x2="590" y2="270" stroke="#444"/>
<text x="320" y="300" text-anchor="middle">{x_label} (0 to {x_max:.1})</text>
<text x="55" y="45" fill="#1f77b4">{} (max axis {a_max:.1})</text>
<text x="585" y="45" text-anchor="end" fill="#d62728">{} (max axis {b_max:.1})</text>
{}
{}
</svg>
"##,
        a.0,
        b.0,
        polyline(a.1, x_max, a_max, "#1f77b4"),
        polyline(b.1, x_max, b_max, "#d62728"),
    )
}

/// Writes `throughput.svg` (against concurrency, when there are several levels) and
/// `latency-over-time.svg` (windows of the last level) into `dir`; returns the paths.
pub fn write(report: &Report, dir: &std::path::Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    if report.levels.len() > 1 {
        let fps: Vec<(f64, f64)> = report
            .levels
            .iter()
            .map(|l| (l.concurrency as f64, l.frames_per_s))
            .collect();
        let p99: Vec<(f64, f64)> = report
            .levels
            .iter()
            .map(|l| (l.concurrency as f64, l.latency_ms.p99))
            .collect();
        let path = dir.join("throughput.svg");
        std::fs::write(
            &path,
            chart(
                "Throughput and p99 against concurrency",
                "concurrency",
                ("frames/s", &fps),
                ("p99 ms", &p99),
            ),
        )?;
        written.push(path);
    }
    if let Some(l) = report.levels.last() {
        let fps: Vec<(f64, f64)> = l
            .windows
            .iter()
            .map(|w| (w.start_s, w.frames_per_s))
            .collect();
        let p99: Vec<(f64, f64)> = l.windows.iter().map(|w| (w.start_s, w.p99_ms)).collect();
        if !fps.is_empty() {
            let path = dir.join("latency-over-time.svg");
            std::fs::write(
                &path,
                chart(
                    &format!("Over time at concurrency {}", l.concurrency),
                    "seconds",
                    ("frames/s", &fps),
                    ("p99 ms", &p99),
                ),
            )?;
            written.push(path);
        }
    }
    Ok(written)
}
