//! DOM glue: find elements by id, set their text, HTML and attributes,
//! read form fields, yield to the browser.

use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;

/// A JS exception or rejected promise as text.
pub fn js_err(v: JsValue) -> String {
    v.as_string()
        .or_else(|| {
            v.dyn_ref::<js_sys::Error>()
                .map(|e| String::from(e.message()))
        })
        .unwrap_or_else(|| format!("{v:?}"))
}

fn document() -> Option<web_sys::Document> {
    web_sys::window().and_then(|w| w.document())
}

pub fn element(id: &str) -> Option<web_sys::Element> {
    document().and_then(|d| d.get_element_by_id(id))
}

pub fn set_html(id: &str, html: &str) {
    if let Some(el) = element(id) {
        el.set_inner_html(html);
    }
}

pub fn set_text(id: &str, text: &str) {
    if let Some(el) = element(id) {
        el.set_text_content(Some(text));
    }
}

pub fn set_attr(id: &str, name: &str, value: &str) {
    if let Some(el) = element(id) {
        let _ = el.set_attribute(name, value);
    }
}

pub fn set_progress(text: &str) {
    set_text("progress", text);
}

/// Enable or disable a form control.
pub fn set_disabled(id: &str, disabled: bool) {
    if let Some(el) = element(id) {
        if disabled {
            let _ = el.set_attribute("disabled", "");
        } else {
            let _ = el.remove_attribute("disabled");
        }
    }
}

pub fn now_ms() -> f64 {
    web_sys::window()
        .and_then(|w| w.performance())
        .map_or(0.0, |p| p.now())
}

/// Let the browser paint before a long synchronous step.
pub async fn next_frame() {
    let p = js_sys::Promise::new(&mut |resolve, _| {
        if let Some(w) = web_sys::window() {
            let _ = w.set_timeout_with_callback_and_timeout_and_arguments_0(&resolve, 0);
        }
    });
    let _ = JsFuture::from(p).await;
}

/// The value of an input, textarea or select.
pub fn input_value(id: &str) -> String {
    element(id)
        .and_then(|e| {
            e.dyn_ref::<web_sys::HtmlInputElement>()
                .map(|i| i.value())
                .or_else(|| {
                    e.dyn_ref::<web_sys::HtmlTextAreaElement>()
                        .map(|t| t.value())
                })
                .or_else(|| e.dyn_ref::<web_sys::HtmlSelectElement>().map(|t| t.value()))
        })
        .unwrap_or_default()
}

/// Call `f` on every submit of the form `id` (default action prevented).
pub fn on_submit(id: &str, mut f: impl FnMut() + 'static) {
    let Some(form) = element(id) else {
        return;
    };
    let cb = Closure::<dyn FnMut(web_sys::Event)>::new(move |ev: web_sys::Event| {
        ev.prevent_default();
        f();
    });
    let _ = form.add_event_listener_with_callback("submit", cb.as_ref().unchecked_ref());
    // The page lives as long as the form: keep the handler.
    cb.forget();
}

/// Call `f` on every click of the element `id`, once per element: a second
/// call for the same element does nothing (`data-wired` marks it).
pub fn on_click(id: &str, mut f: impl FnMut() + 'static) {
    let Some(el) = element(id) else {
        return;
    };
    if el.has_attribute("data-wired") {
        return;
    }
    let _ = el.set_attribute("data-wired", "");
    let cb = Closure::<dyn FnMut(web_sys::Event)>::new(move |_: web_sys::Event| f());
    let _ = el.add_event_listener_with_callback("click", cb.as_ref().unchecked_ref());
    // The page lives as long as the element: keep the handler.
    cb.forget();
}
