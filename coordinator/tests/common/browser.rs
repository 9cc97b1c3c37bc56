//! The dashboard in a browser: a headless Chromium that dumps the page's DOM after its scripts
//! ran, and Playwright (node) for clicks, each found on this machine or skipped unless CI
//! requires it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A Chromium to drive: `SMELT_CHROMIUM`, else the usual names on PATH.
pub fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SMELT_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
        .find(|p| p.is_file())
}

pub fn chromium_or_skip(test: &str) -> Option<PathBuf> {
    let found = chromium();
    if found.is_none() {
        assert!(
            std::env::var("SMELT_REQUIRE_CHROMIUM").as_deref() != Ok("1"),
            "SMELT_REQUIRE_CHROMIUM=1 but no Chromium found (install Debian's chromium, or set SMELT_CHROMIUM)"
        );
        eprintln!("skipping {test}: no Chromium on this machine (SMELT_CHROMIUM or chromium on PATH)");
    }
    found
}

/// The page's DOM after its scripts ran against the live API (virtual time lets its fetches and
/// first redraws finish; the closed-network flags keep Chromium from calling out).
pub fn rendered_dom(chromium: &Path, url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=3000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    let deadline = Instant::now() + Duration::from_secs(90); // hang guard, not a speed check
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium did not finish rendering {url}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success() && dom.contains("</html>"), "chromium failed on {url}: {}", String::from_utf8_lossy(&out.stderr));
    dom
}

/// `node_modules` holding playwright-core (`SMELT_PLAYWRIGHT_DIR`, which CI sets after an npm
/// install), or a skip unless SMELT_REQUIRE_PLAYWRIGHT=1.
pub fn playwright_or_skip(test: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("SMELT_PLAYWRIGHT_DIR").map(PathBuf::from).filter(|d| d.join("playwright-core").is_dir());
    if dir.is_none() {
        assert!(
            std::env::var("SMELT_REQUIRE_PLAYWRIGHT").as_deref() != Ok("1"),
            "SMELT_REQUIRE_PLAYWRIGHT=1 but SMELT_PLAYWRIGHT_DIR names no node_modules with playwright-core"
        );
        eprintln!("skipping {test}: no playwright-core (npm install playwright-core; SMELT_PLAYWRIGHT_DIR=its node_modules)");
    }
    dir
}
