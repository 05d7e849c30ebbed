//! The seed's analytics and reward endpoints on a real relay (port 0):
//! `/experts/stats/{name}`, `/experts/top`, `/experts/reward/{name}`,
//! `/rewards/{key}`, `/usage/report`; counters and rewards survive a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common::*;
use ed25519_dalek::{Signer as _, SigningKey};
use relay::rewards::reward_message;
use relay::usage::{
    ReportEntry, UsageReport, MINER_UC_PER_TOKEN, PEER_UC_PER_MIB, REPORT_PERIOD_MS,
};
use serde_json::Value;
use web_node::chain::BlockHash;

fn head_of(url: &str, name: &str) -> BlockHash {
    let heads: Vec<Value> = get(&format!("{url}/heads")).json();
    let h = heads
        .iter()
        .find(|h| h["name"] == name)
        .unwrap_or_else(|| panic!("no head {name}: {heads:?}"));
    h["hash"].as_str().unwrap().parse().unwrap()
}

fn signed_reward(url: &str, name: &str, key: Option<&SigningKey>) -> Resp {
    let mut r = ureq::post(&format!("{url}/experts/reward/{name}"));
    if let Some(k) = key {
        let ts = (web_node::chain::now_ms() / 1000).to_string();
        let sig = k.sign(&reward_message(name, &ts));
        r = r
            .set("x-aiblock-key", &hex::encode(k.verifying_key().to_bytes()))
            .set("x-aiblock-timestamp", &ts)
            .set("x-aiblock-signature", &hex::encode(sig.to_bytes()));
    }
    to_resp(r.call())
}

fn report(url: &str, r: &UsageReport) -> Resp {
    post_json(
        &format!("{url}/usage/report"),
        &serde_json::to_vec(r).unwrap(),
    )
}

#[test]
fn stats_top_rewards_and_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let data = tmp.path().join("data");
    let relay = TestRelay::start(&data, Some(&model), None);
    let url = relay.url.clone();
    let op = relay::genesis::operator_key(&data).unwrap();
    let e1 = head_of(&url, "layer0.expert1");
    let e2 = head_of(&url, "layer1.expert3");

    // Fresh: zeros; unknown and malformed names are clear errors.
    let s: Value = get(&format!("{url}/experts/stats/layer0.expert1")).json();
    assert_eq!(s["tokens_routed"], 0);
    assert_eq!(s["versions"].as_array().unwrap().len(), 1);
    assert_eq!(s["head"], e1.to_hex());
    let e = get(&format!("{url}/experts/stats/layer9.expert0")).error(404);
    assert!(e.message.contains("no expert layer9.expert0"), "{e:?}");
    let e = get(&format!("{url}/experts/stats/shared")).error(400);
    assert!(e.message.contains("not an expert slot"), "{e:?}");
    get(&format!("{url}/experts/stats/..%2F..%2Fetc")).error(400);
    for bad in ["0", "-1", "abc", "1001", "", "1e3"] {
        let e = get(&format!("{url}/experts/top?limit={bad}")).error(400);
        assert!(
            e.message
                .contains("limit must be an integer from 1 to 1000"),
            "{bad}: {e:?}"
        );
    }

    // Work the relay saw: inference routed to e1 (and e2), verified bytes
    // and a computation by a peer, a corrupt chunk by another.
    let peer = [0x51u8; 32];
    let liar = [0x52u8; 32];
    relay
        .state
        .usage
        .record_inference(&[(e1, 40, 2_000), (e2, 5, 1_000)]);
    relay.state.usage.record_chunk_served(&peer, &e1, 2 << 20);
    relay.state.usage.record_compute(&peer, &e1);
    relay.state.usage.record_bad_chunk(&liar, &e1);

    let s: Value = get(&format!("{url}/experts/stats/layer0.expert1")).json();
    assert_eq!(s["calls"], 1);
    assert_eq!(s["tokens_routed"], 40);
    assert_eq!(s["bytes_served"], 2 << 20);
    assert_eq!(s["computations_served"], 1);
    let peers = s["versions"][0]["peers"].as_array().unwrap();
    let liar_row = peers
        .iter()
        .find(|p| p["key"] == hex::encode(liar))
        .unwrap();
    assert_eq!(liar_row["bad_chunks"], 1);
    assert_eq!(liar_row["bytes"], 0);

    let top: Value = get(&format!("{url}/experts/top?limit=2")).json();
    let rows = top["experts"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["expert"], "layer0.expert1");
    assert_eq!(rows[1]["expert"], "layer1.expert3");
    assert_eq!(rows[0]["rank"], 1);
    let all: Value = get(&format!("{url}/experts/top")).json();
    assert_eq!(all["experts"].as_array().unwrap().len(), 10);

    // Rewards: operator only.
    let e = signed_reward(&url, "layer0.expert1", None).error(401);
    assert!(e.message.contains("operator"), "{e:?}");
    signed_reward(&url, "layer0.expert1", Some(&miner_key(9))).error(403);
    signed_reward(&url, "layer7.expert1", Some(&op)).error(404);
    let paid: Value = signed_reward(&url, "layer0.expert1", Some(&op)).json();
    let entries = paid["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{paid}");
    // Genesis version (no parent loss: quality 100 %), latency 2 ms (speed 100 %).
    assert_eq!(entries[0]["role"], "miner");
    assert_eq!(entries[0]["amount_uc"], 40 * MINER_UC_PER_TOKEN);
    assert_eq!(
        entries[0]["key"],
        hex::encode(op.verifying_key().to_bytes())
    );
    assert_eq!(entries[1]["role"], "peer");
    assert_eq!(
        entries[1]["amount_uc"],
        2 * PEER_UC_PER_MIB + relay::usage::PEER_UC_PER_COMPUTE
    );
    // Nothing new: nothing paid twice.
    let again: Value = signed_reward(&url, "layer0.expert1", Some(&op)).json();
    assert_eq!(again["paid_uc"], 0);
    let mine: Value = get(&format!("{url}/rewards/{}", hex::encode(peer))).json();
    assert_eq!(
        mine["peer_uc"],
        2 * PEER_UC_PER_MIB + relay::usage::PEER_UC_PER_COMPUTE
    );
    let none: Value = get(&format!("{url}/rewards/{}", hex::encode(liar))).json();
    assert_eq!(none["total_uc"], 0);
    get(&format!("{url}/rewards/nothex")).error(400);

    // Self-reports: only for blocks this key fetched through the relay,
    // signed, once, within the cap.
    let node = miner_key(33);
    let nk = node.verifying_key().to_bytes();
    let period = web_node::chain::now_ms() / REPORT_PERIOD_MS;
    let entry = |b: BlockHash, tokens| {
        vec![ReportEntry {
            block: b,
            calls: 1,
            tokens,
        }]
    };
    let e = report(&url, &UsageReport::sign(&node, period, 1, entry(e1, 100))).error(403);
    assert!(e.message.contains("never served"), "{e:?}");
    relay.state.usage.record_fetch(&nk, &e1);
    let out: Value = report(&url, &UsageReport::sign(&node, period, 2, entry(e1, 100))).json();
    assert_eq!(out["accepted_tokens"], 100);
    let e = report(&url, &UsageReport::sign(&node, period, 2, entry(e1, 100))).error(403);
    assert!(e.message.contains("replay"), "{e:?}");
    let mut forged = UsageReport::sign(&node, period, 3, entry(e1, 100));
    forged.entries[0].tokens = 5_000;
    report(&url, &forged).error(403);
    report(
        &url,
        &UsageReport::sign(&node, period.saturating_sub(5), 4, entry(e1, 1)),
    )
    .error(403);
    let out: Value = report(
        &url,
        &UsageReport::sign(&node, period, 5, entry(e1, 1_000_000)),
    )
    .json();
    assert_eq!(
        out["accepted_tokens"],
        relay::usage::REPORT_TOKENS_CAP - 100
    );
    let out: Value = report(&url, &UsageReport::sign(&node, period, 6, entry(e1, 10))).json();
    assert_eq!(out["accepted_tokens"], 0);
    // Unsigned / malformed / wrong type.
    post_json(&format!("{url}/usage/report"), b"{\"key\":\"00\"}").error(400);
    post_json(&format!("{url}/usage/report"), b"not json").error(400);
    post_bin(&format!("{url}/usage/report"), b"{}").error(415);
    let s: Value = get(&format!("{url}/experts/stats/layer0.expert1")).json();
    assert_eq!(s["reported_tokens"], relay::usage::REPORT_TOKENS_CAP);

    // A restart keeps counters, the replay table and the ledger.
    drop(s);
    relay.stop();
    let relay = TestRelay::start(&data, Some(&model), None);
    let url = relay.url.clone();
    let s: Value = get(&format!("{url}/experts/stats/layer0.expert1")).json();
    assert_eq!(s["tokens_routed"], 40);
    assert_eq!(s["reported_tokens"], relay::usage::REPORT_TOKENS_CAP);
    assert_eq!(s["bytes_served"], 2 << 20);
    report(&url, &UsageReport::sign(&node, period, 2, entry(e1, 100))).error(403);
    let mine: Value = get(&format!("{url}/rewards/{}", hex::encode(peer))).json();
    assert_eq!(mine["entries"].as_array().unwrap().len(), 1);
    let again: Value = signed_reward(&url, "layer0.expert1", Some(&op)).json();
    // Only the self-reported units are new: 25 % of the cap.
    assert_eq!(
        again["paid_uc"],
        relay::usage::REPORT_TOKENS_CAP * relay::usage::REPORT_WEIGHT_PCT / 100
            * MINER_UC_PER_TOKEN
    );
}

/// Peer transfers through the relay: the honest holder's verified bytes are
/// counted for it, the liar's corrupt chunk earns nothing, and the fetcher
/// may then report usage of that block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_transfers_count_verified_bytes_only() {
    use crate::common::ws::*;
    use web_node::net::peer::ChunkSource;

    let env = PeerEnv::start(relay::peers::PeerOptions::default());
    let url = env.relay.url.clone();
    let peers = env.relay.state.peers.clone();
    let (liar, honest, fetcher) = (miner_key(40), miner_key(41), miner_key(42));
    let id = |k: &SigningKey| k.verifying_key().to_bytes();
    let mut wl = login_as(&env.addr(), &liar).await;
    let mut wh = login_as(&env.addr(), &honest).await;
    // The liar looks cheaper, so it is asked first.
    for (ws, load) in [(&mut wl, 0u16), (&mut wh, 1000)] {
        announce(ws, load, false, vec![env.hash()]).await;
    }
    until("both holders", || peers.holders_of(&env.hash()).len() == 2).await;
    let cs = env.info.chunk_size as usize;
    let lying = tokio::spawn(serve_chunks(wl, env.payload.clone(), cs, true));
    let honest_task = tokio::spawn(serve_chunks(wh, env.payload.clone(), cs, false));
    let mut wf = login_as(&env.addr(), &fetcher).await;
    let (data, from) = fetch_chunk(&mut wf, 1, env.hash(), 0).await.unwrap();
    assert_eq!(data, env.chunk(0));
    assert_eq!(from, ChunkSource::Peer(id(&honest)));

    let name = "layer0.expert1";
    let stats = tokio::task::spawn_blocking({
        let url = url.clone();
        move || get(&format!("{url}/experts/stats/{name}")).json::<Value>()
    })
    .await
    .unwrap();
    let head = stats["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["is_head"] == true)
        .unwrap()
        .clone();
    assert_eq!(head["block"], env.hash().to_hex());
    assert_eq!(head["bytes_served"], data.len() as u64, "{stats}");
    let row = |k: &SigningKey| {
        head["peers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["key"] == hex::encode(id(k)))
            .cloned()
            .unwrap_or_else(|| panic!("no row for a peer in {head}"))
    };
    assert_eq!(row(&honest)["bytes"], data.len() as u64);
    assert_eq!(row(&liar)["bytes"], 0);
    assert_eq!(row(&liar)["bad_chunks"], 1);
    assert!(env.relay.state.usage.fetched(&id(&fetcher), &env.hash()));
    assert!(!env.relay.state.usage.fetched(&id(&liar), &env.hash()));

    // The operator pays: the honest peer earns for its bytes, the liar nothing.
    let op = relay::genesis::operator_key(&env.tmp.path().join("data")).unwrap();
    let paid: Value = tokio::task::spawn_blocking({
        let url = url.clone();
        move || signed_reward(&url, name, Some(&op)).json()
    })
    .await
    .unwrap();
    let entries = paid["entries"].as_array().unwrap();
    let honest_paid: Vec<_> = entries
        .iter()
        .filter(|e| e["key"] == hex::encode(id(&honest)))
        .collect();
    assert_eq!(honest_paid.len(), 1, "{paid}");
    assert_eq!(
        honest_paid[0]["amount_uc"],
        data.len() as u64 * PEER_UC_PER_MIB / (1 << 20)
    );
    assert!(
        entries.iter().all(|e| e["key"] != hex::encode(id(&liar))),
        "{paid}"
    );
    honest_task.abort();
    lying.abort();
}

/// `/chat` counts, per expert version, exactly the tokens its answer says
/// each layer routed.
#[test]
fn chat_counts_the_tokens_it_routed() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let relay = TestRelay::start(&tmp.path().join("data"), Some(&model), None);
    let url = relay.url.clone();
    let r = post_json(
        &format!("{url}/chat"),
        br#"{"prompt": "abc", "max_tokens": 4, "use_moe": true}"#,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let answer: Value = r.json();
    let layers = answer["experts"].as_array().unwrap();
    assert!(!layers.is_empty(), "{answer}");
    let mut checked = 0;
    for (l, used) in layers.iter().enumerate() {
        for u in used.as_array().unwrap() {
            let name = format!("layer{l}.expert{}", u["expert"]);
            let s: Value = get(&format!("{url}/experts/stats/{name}")).json();
            assert_eq!(s["tokens_routed"], u["tokens"], "{name}: {s}");
            assert_eq!(s["calls"], 1, "{name}");
            checked += 1;
        }
    }
    assert!(checked >= layers.len(), "every layer routed somewhere");
}
