//! Quantized models on a real relay (127.0.0.1:0) serving the default
//! model: the q8_0 model published as its own meta block (every block naming
//! its source) is accepted and answers `/chat` (`"model": "<name>-q8_0"`)
//! exactly as the native CPU engine with the same quantized experts; a
//! quantized block whose one scale was altered (validly re-signed) is
//! refused with 422 naming the tensor and the group, and nothing of it is
//! stored; a quantized expert uploaded under the float model is refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common::*;
use web_node::chain::{Block, BlockBuilder, BlockHash, BlockKind, MetaPayload, PayloadDtype};
use web_node::model::checkpoint::Signer;
use web_node::model::generate::generate;
use web_node::model::load::ModelDir;
use web_node::model::quant::QuantizingSource;
use web_node::model::quant_chain::{quantize_model, BlockWithPayload};
use web_node::model::reference::CpuModel;
use web_node::model::sampler::Sampler;
use web_node::model::{QuantFormat, RunOptions, Slot};
use web_node::net::api::{codes, BlockInfo};
use web_node::net::chat::ChatResponse;

fn fetch(url: &str, info: &BlockInfo) -> BlockWithPayload {
    let env = get(&format!("{url}/blocks/{}?format=bin", info.hash));
    assert_eq!(env.status, 200);
    let b = Block::decode(&env.body).unwrap();
    let p = get(&format!("{url}/blocks/{}/payload", info.hash));
    assert_eq!(p.status, 200);
    (b, p.body)
}

fn publish(url: &str, blocks: &[BlockWithPayload]) {
    for (b, p) in blocks {
        let r = post_bin(&format!("{url}/blocks"), &envelope_and_payload(b, p));
        assert_eq!(
            r.status,
            201,
            "{}: {}",
            b.header.name,
            String::from_utf8_lossy(&r.body)
        );
    }
}

#[test]
fn quantized_models_are_published_rederived_and_served() {
    let tmp = tempfile::tempdir().unwrap();
    let model = copy_default_model(tmp.path());
    let data = tmp.path().join("data");
    let relay = TestRelay::start_with(&data, Some(&model), None, test_support::relay::unthrottled);
    let url = relay.url.clone();
    let a: Vec<BlockInfo> = get_json(&format!("{url}/chain/A/blocks"));
    let b: Vec<BlockInfo> = get_json(&format!("{url}/chain/B/blocks"));
    let meta = fetch(&url, &a[0]);
    let heads: Vec<BlockWithPayload> = b
        .iter()
        .filter(|i| i.is_head)
        .map(|i| fetch(&url, i))
        .collect();
    let key = operator_key(&data);
    let signer = Signer {
        key: &key,
        address: "operator".into(),
        timestamp_ms: 1_700_000_000_000,
        chunk_size: 64 * 1024,
    };

    // The q8_0 model: accepted block by block, and it re-derives. One
    // thread or two make the same blocks.
    let q8 = quantize_model(&meta, &heads, QuantFormat::Q8_0, &signer, 2).unwrap();
    let q8_one = quantize_model(&meta, &heads, QuantFormat::Q8_0, &signer, 1).unwrap();
    assert_eq!(
        q8.iter().map(|(b, _)| b.hash).collect::<Vec<_>>(),
        q8_one.iter().map(|(b, _)| b.hash).collect::<Vec<_>>(),
        "the thread count changed a block hash"
    );
    publish(&url, &q8);
    let expert_bytes: (usize, usize) = q8
        .iter()
        .skip(1)
        .zip(&heads)
        .filter(|((b, _), _)| b.header.kind == BlockKind::Expert)
        .fold((0, 0), |(q, f), ((_, qp), (_, fp))| {
            (q + qp.len(), f + fp.len())
        });
    assert!(
        expert_bytes.0 * 3 < expert_bytes.1,
        "q8_0 experts {expert_bytes:?}"
    );

    // /chat on the quantized model (by name) equals the native CPU engine
    // with the same quantized experts; the float model is still there by hash.
    let dir = ModelDir::load(&model).unwrap();
    let prompt = "Q: copy cat sun dog A:";
    let native = {
        let mut m = CpuModel::from_model_dir(&dir).unwrap();
        m.set_source(QuantizingSource {
            inner: dir.expert_source().unwrap(),
            format: QuantFormat::Q8_0,
        });
        generate(
            &mut m,
            &dir.tokenizer,
            prompt,
            8,
            &mut Sampler::greedy(),
            &RunOptions::default(),
            |_, _| true,
        )
        .unwrap()
    };
    let r = post_json(
        &format!("{url}/chat"),
        format!(
            r#"{{"prompt": "{prompt}", "max_tokens": 8, "model": "{}"}}"#,
            q8[0].0.header.name
        )
        .as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let c: ChatResponse = r.json();
    assert_eq!(c.tokens, native.tokens, "{}", c.response);
    assert_eq!(c.model, q8[0].0.hash.to_hex());
    let r = post_json(
        &format!("{url}/chat"),
        format!(
            r#"{{"prompt": "{prompt}", "max_tokens": 2, "model": "{}"}}"#,
            meta.0.hash
        )
        .as_bytes(),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json::<ChatResponse>().model, meta.0.hash.to_hex());
    let r = post_json(
        &format!("{url}/chat"),
        br#"{"prompt": "x", "model": "no-such-model"}"#,
    );
    assert_eq!(r.status, 404, "{}", String::from_utf8_lossy(&r.body));
    let long = "m".repeat(129);
    let r = post_json(
        &format!("{url}/chat"),
        format!(r#"{{"prompt": "x", "model": "{long}"}}"#).as_bytes(),
    );
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        r.error(400).message.contains("1..=128"),
        "{}",
        r.error(400).message
    );

    // q4_0: one expert block with one scale altered, validly re-signed.
    let q4 = quantize_model(&meta, &heads, QuantFormat::Q4_0, &signer, 1).unwrap();
    let (victim, rest): (Vec<_>, Vec<_>) = q4
        .iter()
        .cloned()
        .partition(|(b, _)| b.header.name == "layer2.expert5");
    publish(&url, &rest);
    let (vb, vp) = &victim[0];
    let tensor = "model.layers.2.block_sparse_moe.experts.5.w3.weight";
    let st = web_node::chain::parse_safetensors(vp).unwrap();
    let scales = st.tensor(&format!("{tensor}.scales")).unwrap();
    let at = scales.data().as_ptr() as usize - vp.as_ptr() as usize + 2 * (7 * 4 + 2); // row 7, group 2
    let mut bad = vp.clone();
    bad[at] ^= 0x01;
    let forged = BlockBuilder::slot(
        vb.header.meta.unwrap(),
        Slot::parse(&vb.header.name).unwrap(),
        PayloadDtype::Q4_0,
    )
    .parents(vb.header.parents.clone())
    .address("operator".to_string())
    .timestamp_ms(1_700_000_000_001)
    .chunk_size(vb.header.chunk_size)
    .sign(&bad, &key);
    let r = post_bin(
        &format!("{url}/blocks"),
        &envelope_and_payload(&forged, &bad),
    );
    assert_eq!(r.status, 422, "{}", String::from_utf8_lossy(&r.body));
    let e = r.error(422);
    assert_eq!(e.code, codes::REJECTED);
    assert!(
        e.message.contains(tensor) && e.message.contains("group 2") && e.message.contains("row 7"),
        "{}",
        e.message
    );
    assert_eq!(get(&format!("{url}/blocks/{}", forged.hash)).status, 404);
    assert!(
        std::fs::read_dir(data.join("tmp"))
            .unwrap()
            .next()
            .is_none(),
        "nothing staged is left"
    );
    // The honest block is accepted after the forgery.
    publish(&url, &victim);

    // A quantized expert under the float model is refused before its payload.
    let float_meta = meta.0.hash;
    let src = heads
        .iter()
        .find(|(b, _)| b.header.name == "layer0.expert0")
        .unwrap();
    let qp = web_node::model::quant::quantize_payload(
        &MetaPayload::parse(&meta.1).unwrap().1,
        Slot::parse("layer0.expert0").unwrap(),
        &src.1,
        QuantFormat::Q8_0,
    )
    .unwrap();
    let wrong = BlockBuilder::slot(
        float_meta,
        Slot::parse("layer0.expert0").unwrap(),
        PayloadDtype::Q8_0,
    )
    .parents(vec![src.0.hash])
    .candidate_loss(Some(0.001))
    .address("operator".to_string())
    .timestamp_ms(1_700_000_000_002)
    .sign(&qp, &key);
    // Refused from the payload's safetensors header, before the rest is
    // read: send the envelope and that header only, under the whole upload's
    // length (a client streaming the rest may see the relay close on it,
    // EPIPE, before it reads the 400).
    let st_header = 8 + u64::from_le_bytes(qp[..8].try_into().unwrap()) as usize;
    let mut req = format!(
        "POST /blocks HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        envelope_and_payload(&wrong, &qp).len()
    )
    .into_bytes();
    req.extend_from_slice(&envelope_and_payload(&wrong, &qp[..st_header]));
    let (status, text) = raw(&relay.addr(), &req);
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("quantized model"), "{text}");

    // After a restart every block still validates from the listing.
    relay.stop();
    let relay = TestRelay::start(&data, None, None);
    let n = fetch_and_validate_all(&relay.url);
    assert_eq!(n, 3 * (1 + 1 + 4 + 32), "three models' blocks");
    let _: BlockHash = q8[0].0.hash;
}
