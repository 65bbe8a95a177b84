// The approval page's only script (served from this origin; the CSP allows nothing else).
// It runs the WebAuthn ceremonies: options come from the broker for this page's link,
// the browser asks the authenticator (user verification required), and the answer goes
// back in an ordinary form POST carrying the page's CSRF token.
"use strict";

function status(text, kind) {
  const el = document.getElementById("status");
  el.textContent = text;
  el.className = kind;
}

async function options(form) {
  const link = form.dataset.link;
  const csrf = document.getElementById("csrf").value;
  const resp = await fetch("/approve/" + encodeURIComponent(link) + "/options", {
    method: "POST",
    headers: { "X-Apm-Csrf": csrf },
    credentials: "omit",
  });
  if (!resp.ok) {
    throw new Error("the broker refused: " + resp.status);
  }
  return resp.json();
}

async function decideWithPasskey(choice) {
  const form = document.getElementById("decide");
  try {
    status("waiting for your passkey…", "");
    const json = await options(form);
    const publicKey = PublicKeyCredential.parseRequestOptionsFromJSON(json);
    const cred = await navigator.credentials.get({ publicKey });
    document.getElementById("assertion").value = JSON.stringify(cred.toJSON());
    const decision = document.createElement("input");
    decision.type = "hidden";
    decision.name = "decision";
    decision.value = choice;
    form.appendChild(decision);
    form.submit();
  } catch (err) {
    status("passkey failed: " + err, "error");
  }
}

async function registerPasskey() {
  const form = document.getElementById("register");
  try {
    status("waiting for your authenticator…", "");
    const json = await options(form);
    const publicKey = PublicKeyCredential.parseCreationOptionsFromJSON(json);
    const cred = await navigator.credentials.create({ publicKey });
    document.getElementById("credential").value = JSON.stringify(cred.toJSON());
    form.submit();
  } catch (err) {
    status("registration failed: " + err, "error");
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const approve = document.getElementById("passkey-approve");
  if (approve) approve.addEventListener("click", () => decideWithPasskey("approve"));
  const deny = document.getElementById("deny");
  if (deny && deny.dataset.passkey) deny.addEventListener("click", () => decideWithPasskey("deny"));
  const register = document.getElementById("passkey-register");
  if (register) register.addEventListener("click", registerPasskey);
});
