/work/main/loom/target/release/deps/tower_key_rotation_loom-9af51638ad75aa0e.d: src/lib.rs

/work/main/loom/target/release/deps/tower_key_rotation_loom-9af51638ad75aa0e: src/lib.rs

src/lib.rs:
