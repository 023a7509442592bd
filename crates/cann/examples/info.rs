//! Prints what `moe-bench info --backend cann` prints: the probe result and
//! the operator map. `cargo run -p moe-hal-cann --example info`
fn main() {
    print!("{}", moe_hal_cann::info_text());
    if let Err(e) = moe_hal_cann::CannBackend::new() {
        println!("CannBackend::new(): {e}");
    }
}
