/* The payment page's script: everything works without it (the server renders the state and
   a refresh link); with it, the page follows the invoice live, counts down, copies, and pays
   through a browser wallet (EIP-1193). It loads nothing from anywhere but this origin. */
(function () {
  "use strict";
  var data = null, source = null, pollTimer = null, countdownTimer = null, redirectTimer = null, refreshing = false, again = false;

  function $(id) { return document.getElementById(id); }
  function main() { return $("checkout"); }
  function s(key, values) {
    var text = (data && data.strings[key]) || key;
    return text.replace(/\{(\w+)\}/g, function (_, name) { return values && name in values ? values[name] : ""; });
  }

  function readData() {
    var el = $("checkout-data");
    data = el ? JSON.parse(el.textContent) : null;
  }

  /* ---------------------------------------------------------------- live status */

  function onStatus(status) {
    var m = main();
    if (!m) { return; }
    if (String(status.version) !== m.dataset.version || String(status.confirmations) !== m.dataset.confirmations ||
        status.screen !== m.dataset.screen) {
      refresh();
    }
  }

  function refresh() {
    // One page renderer, the server's: fetch the page again and swap its main part in place.
    if (refreshing) { again = true; return; }
    refreshing = true;
    fetch(location.href, { headers: { "Accept": "text/html" }, cache: "no-store", credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (text) {
        var fresh = new DOMParser().parseFromString(text, "text/html").getElementById("checkout");
        var old = main();
        if (!fresh || !old) { return; }
        var focused = document.activeElement && document.activeElement.id;
        var screenChanged = fresh.dataset.screen !== old.dataset.screen;
        var message = $("wallet-message");
        var keep = message && !screenChanged ? { text: message.textContent, cls: message.className } : null;
        old.replaceWith(document.adoptNode(fresh));
        if (keep && $("wallet-message")) { $("wallet-message").textContent = keep.text; $("wallet-message").className = keep.cls; }
        start();
        if (focused && $(focused)) { $(focused).focus(); }
        if (screenChanged || fresh.querySelector("#progress")) { announce(); }
      })
      .catch(function () { /* the next message or poll tries again */ })
      .then(function () { refreshing = false; if (again) { again = false; refresh(); } });
  }

  function announce() {
    var title = $("state-title"), body = $("state-body"), progress = $("progress-text");
    var live = $("live");
    if (live && title) {
      live.textContent = title.textContent + ". " + (progress ? progress.textContent : (body ? body.textContent : ""));
    }
  }

  function listen() {
    if (!data || source || pollTimer) { return; }
    if (!window.EventSource) { poll(); return; }
    source = new EventSource(data.events_url);
    source.addEventListener("status", function (e) { onStatus(JSON.parse(e.data)); });
    source.onerror = function () {
      // The browser reconnects by itself (sending Last-Event-ID); a refused stream (busy) is closed: poll instead.
      if (source.readyState === 2) { source = null; poll(); }
    };
  }

  function poll() {
    if (pollTimer) { return; }
    pollTimer = setInterval(function () {
      fetch(data.status_url, { cache: "no-store" }).then(function (r) { return r.json(); }).then(onStatus).catch(function () {});
    }, 5000);
  }

  /* ---------------------------------------------------------------- countdown and redirect */

  function countdown() {
    clearInterval(countdownTimer);
    var el = $("countdown");
    if (!el) { return; }
    var until = Number(el.dataset.until);
    function pad(n) { return (n < 10 ? "0" : "") + n; }
    function tick() {
      var left = Math.max(0, Math.floor(until - Date.now() / 1000));
      if (left === 0) { el.textContent = s("time_up"); clearInterval(countdownTimer); return; }
      var d = Math.floor(left / 86400), h = Math.floor(left % 86400 / 3600), m = Math.floor(left % 3600 / 60), sec = left % 60;
      el.textContent = d ? d + " d " + pad(h) + ":" + pad(m) + ":" + pad(sec) : (h ? h + ":" + pad(m) : pad(m)) + ":" + pad(sec);
    }
    tick();
    countdownTimer = setInterval(tick, 1000);
  }

  function redirect() {
    clearTimeout(redirectTimer);
    if (!data || !data.redirect_to) { return; }
    var note = $("redirect-note");
    if (note) { note.hidden = false; }
    redirectTimer = setTimeout(function () { location.assign(data.redirect_to); }, 4000);
  }

  /* ---------------------------------------------------------------- copy */

  function bindCopy() {
    var buttons = document.querySelectorAll("button.copy");
    Array.prototype.forEach.call(buttons, function (button) {
      if (!navigator.clipboard) { return; }
      button.hidden = false;
      button.addEventListener("click", function () {
        var label = button.textContent;
        navigator.clipboard.writeText(button.dataset.copy).then(function () {
          button.textContent = s("copied");
          setTimeout(function () { button.textContent = label; }, 2000);
        }, function () { say(s("copy_failed"), true); });
      });
    });
  }

  /* ---------------------------------------------------------------- browser wallet (EIP-1193) */

  function say(text, isError) {
    var el = $("wallet-message");
    if (!el) { return; }
    el.textContent = text;
    el.className = "wallet-message" + (isError ? " error" : "");
  }

  function explain(error) {
    var w = data.wallet, code = error && error.code;
    var inner = error && error.data && error.data.originalError && error.data.originalError.code;
    if (code === 4001) { return s("err_rejected"); }
    if (code === 4902 || inner === 4902) { return s("err_unknown_chain", { network: w.network, chain_id: w.chain_id }); }
    if (code === -32002) { return s("err_pending"); }
    if (code === 4100) { return s("err_unauthorized"); }
    if (code === "no_account") { return s("err_no_account"); }
    if (code === "approval_failed") { return s("err_approval_failed"); }
    return s("err_other", { message: (error && error.message) || String(error) });
  }

  function receipt(eth, hash) {
    return new Promise(function (resolve, reject) {
      var tries = 0;
      (function ask() {
        eth.request({ method: "eth_getTransactionReceipt", params: [hash] }).then(function (r) {
          if (r) { resolve(r); } else if (++tries > 200) { reject({ code: "approval_failed" }); } else { setTimeout(ask, 1500); }
        }, reject);
      })();
    });
  }

  function pay(button) {
    var eth = window.ethereum, w = data.wallet, from = null;
    button.disabled = true;
    say(s("wallet_connecting"));
    eth.request({ method: "eth_requestAccounts" })
      .then(function (accounts) {
        if (!accounts || !accounts.length) { throw { code: "no_account" }; }
        from = accounts[0];
        return eth.request({ method: "eth_chainId" });
      })
      .then(function (chainId) {
        if (parseInt(chainId, 16) === w.chain_id) { return null; }
        say(s("wallet_switching", { network: w.network }));
        return eth.request({ method: "wallet_switchEthereumChain", params: [{ chainId: "0x" + w.chain_id.toString(16) }] });
      })
      .then(function () {
        return w.steps.reduce(function (previous, step) {
          return previous.then(function () {
            say(s(step.kind === "approve" ? "wallet_approving" : "wallet_paying"));
            var tx = { from: from, to: step.to, value: step.value, data: step.data };
            return eth.request({ method: "eth_sendTransaction", params: [tx] }).then(function (hash) {
              if (step.kind !== "approve") { return hash; }
              say(s("wallet_waiting_approval"));
              return receipt(eth, hash).then(function (r) {
                if (!r || parseInt(r.status, 16) !== 1) { throw { code: "approval_failed" }; }
              });
            });
          });
        }, Promise.resolve());
      })
      .then(function () { say(s("wallet_sent")); }, function (error) { say(explain(error), true); })
      .then(function () { button.disabled = false; });
  }

  function bindWallet() {
    var button = $("wallet-button");
    if (!button || !data || !data.wallet || !window.ethereum || typeof window.ethereum.request !== "function") { return; }
    button.hidden = false;
    button.addEventListener("click", function () { pay(button); });
  }

  /* ---------------------------------------------------------------- start */

  function start() {
    readData();
    bindCopy();
    bindWallet();
    countdown();
    redirect();
    listen();
  }

  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", start); } else { start(); }
})();
