"use strict";
(() => {
  const form = document.getElementById("login");
  const error = document.getElementById("error");
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    error.classList.add("hidden");
    try {
      const { csrf } = await (await fetch("/api/login-token", { credentials: "same-origin" })).json();
      const res = await fetch("/api/login", {
        method: "POST", credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
        body: JSON.stringify({ name: document.getElementById("name").value, password: document.getElementById("password").value }),
      });
      if (res.ok) { window.location.assign("/"); return; }
      const data = await res.json().catch(() => ({}));
      error.textContent = typeof data.detail === "string" ? data.detail : "sign-in failed";
    } catch (err) {
      error.textContent = `sign-in failed: ${err.message}`;
    }
    error.classList.remove("hidden");
    document.getElementById("password").value = "";
  });
})();
