//! Plugins and fixtures for tests. The Rust example plugins are compiled to wasm32-wasip2
//! components by `tests/build.rs`; the WAT fixtures are text, loaded as they are.

include!(concat!(env!("OUT_DIR"), "/plugins.rs"));

/// The plugin contract, `wit/plugin.wit`.
pub const WIT_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../wit");

/// A core module, not a component (exports `init`/`process` core functions): must be refused.
pub const NOT_A_PLUGIN_WAT: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/not-a-plugin.wat");

/// A component exporting `sluice:plugin/transform@0.1.0` with the wrong shape (no `init`,
/// `process: func() -> u32`): must fail type-checking against the `plugin` world.
pub const WRONG_WORLD_WAT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/wrong-world.wat");

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic in a test is a failure with a backtrace
mod tests {
    use super::*;

    /// `\0asm`, then version 0x0d and layer 1: a component, not a core module (layer 0).
    const COMPONENT_PREAMBLE: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];

    #[test]
    fn enrich_plugin_is_a_component() {
        let bytes = std::fs::read(ENRICH_WASM).unwrap();
        assert_eq!(bytes[..8], COMPONENT_PREAMBLE, "{ENRICH_WASM}");
        let exports = b"sluice:plugin/transform@0.1.0";
        assert!(
            bytes.windows(exports.len()).any(|w| w == exports),
            "{ENRICH_WASM} does not mention the transform interface"
        );
    }

    /// Loaders compiling the same component into one cache dir at once (pipelines of one
    /// process, processes sharing the dir) must all succeed: they once shared a temporary file
    /// name, and the loser of the race failed its rename with "No such file or directory".
    #[test]
    fn concurrent_loads_share_the_plugin_cache() {
        let dir = tempfile::tempdir().unwrap();
        std::thread::scope(|s| {
            let loads: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        let runtime = sluice::stage::wasm::runtime::PluginRuntime::new(Some(
                            dir.path().to_path_buf(),
                        ))?;
                        runtime.load_file(std::path::Path::new(ENRICH_WASM))
                    })
                })
                .collect();
            for l in loads {
                l.join().unwrap().unwrap();
            }
        });
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left.len(), 2, "artifact and checksum only: {left:?}");
        assert!(left.iter().all(|n| !n.ends_with(".tmp")), "{left:?}");
    }

    #[test]
    fn fixtures_are_present() {
        for path in [NOT_A_PLUGIN_WAT, WRONG_WORLD_WAT] {
            let text = std::fs::read_to_string(path).unwrap();
            assert!(
                text.contains("(module") || text.contains("(component"),
                "{path}"
            );
        }
        assert!(std::path::Path::new(WIT_DIR).join("plugin.wit").is_file());
    }
}
