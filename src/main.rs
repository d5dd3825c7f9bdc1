fn main() {
    for crd in fleetpatch::api::crds() {
        println!("---\n{}", serde_yaml_ng::to_string(&crd).unwrap());
    }
}
