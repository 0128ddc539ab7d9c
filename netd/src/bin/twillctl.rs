fn main() {
    println!("twillctl {}", env!("CARGO_PKG_VERSION"));
}
