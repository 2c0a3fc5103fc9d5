// s2ray gallery page: loads each asset's mesh script when its card comes near the screen and opens its
// orbit view; writes what loaded into <body data-*> for a headless browser check.
(function () {
  "use strict";
  var loaded = {};

  function load(canvas) {
    var src = canvas.getAttribute("data-mesh"), id = canvas.getAttribute("data-asset");
    if (loaded[src]) return;
    loaded[src] = true;
    S2Viewer.view(canvas, id, parseFloat(canvas.getAttribute("data-elevation")),
                  parseFloat(canvas.getAttribute("data-azimuth")));
    if (S2Viewer.error()) { fail(canvas, S2Viewer.error()); return; }
    var s = document.createElement("script");
    s.src = src;
    s.onerror = function () { fail(canvas, "mesh data missing: " + src); };
    document.head.appendChild(s);
  }

  function fail(canvas, why) {
    canvas.setAttribute("data-error", why);
    var note = canvas.parentNode.querySelector(".viewnote");
    if (note) note.textContent = why;
  }

  function count() {
    var imgs = document.querySelectorAll("img.preview, img.input"), ok = 0, previews = 0, total = 0;
    imgs.forEach(function (im) {
      var good = im.complete && im.naturalWidth > 0;
      if (im.classList.contains("preview")) { total++; if (good) previews++; }
      if (good) ok++;
    });
    document.body.setAttribute("data-previews-loaded", String(previews));
    document.body.setAttribute("data-previews-total", String(total));
    document.body.setAttribute("data-images-loaded", String(ok));
    document.body.setAttribute("data-views-drawn",
                               String(document.querySelectorAll("canvas.view[data-drawn]").length));
    var first = document.querySelector(".asset.ok");
    if (first) {  // where the first card's three panels sit, for a check of a screenshot of the page
      var box = {};
      [["input", "img.input"], ["preview", "img.preview"], ["view", "canvas.view"]].forEach(function (p) {
        var el = first.querySelector(p[1]);
        if (el) { var r = el.getBoundingClientRect(); box[p[0]] = [r.left, r.top, r.width, r.height]; }
      });
      document.body.setAttribute("data-first-card", JSON.stringify(box));
    }
  }

  window.addEventListener("load", function () {
    var canvases = document.querySelectorAll("canvas.view"), margin = 400;
    var seen = "IntersectionObserver" in window && new IntersectionObserver(function (entries) {
      entries.forEach(function (e) { if (e.isIntersecting) { load(e.target); seen.unobserve(e.target); } });
    }, {rootMargin: margin + "px"});
    canvases.forEach(function (c) {  // what is on the screen now loads at once, the rest when scrolled near
      var r = c.getBoundingClientRect();
      if (!seen || r.top < window.innerHeight + margin) load(c); else seen.observe(c);
    });
    S2Viewer.ondraw = count;
    count();
  });
})();
