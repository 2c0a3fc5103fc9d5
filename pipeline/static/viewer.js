// s2ray mesh viewer: an orbit view of an untextured triangle mesh, in plain WebGL (no library).
//
// One WebGL context draws every view of the page (browsers keep only about 16 contexts alive): each
// view is a 2D canvas, and a redraw renders into the shared WebGL canvas and copies the pixels over.
// Meshes arrive as S2Viewer.mesh(id, meta, base64) calls from small script files, so the page works
// when opened from a file (where fetch() of a local file is refused) as well as over http.
// Shading matches the library's CPU previews: grey clay, key and fill light fixed to the camera.
(function () {
  "use strict";
  var FOV = 40 * Math.PI / 180;
  var VERT = "#version 300 es\n" +
    "in vec3 a_pos; uniform vec4 u_q; uniform mat4 u_mv; uniform mat4 u_proj; out vec3 v_pos;\n" +
    "void main() { vec4 p = u_mv * vec4(u_q.xyz + a_pos * u_q.w, 1.0); v_pos = p.xyz; gl_Position = u_proj * p; }\n";
  var FRAG = "#version 300 es\nprecision highp float;\n" +
    "in vec3 v_pos; out vec4 color;\n" +
    "void main() {\n" +
    "  vec3 n = normalize(cross(dFdx(v_pos), dFdy(v_pos)));\n" +  // flat normal, towards the viewer
    "  vec3 toEye = normalize(-v_pos);\n" +
    "  float light = 0.28 + 0.75 * max(dot(n, normalize(vec3(-0.45, 0.65, 0.6))), 0.0)\n" +
    "                     + 0.25 * max(dot(n, normalize(vec3(0.7, 0.1, 0.7))), 0.0);\n" +
    "  float facing = clamp(dot(n, toEye), 0.0, 1.0);\n" +
    "  float v = 0.62 * light * (gl_FrontFacing ? 1.0 : 0.8) + 0.12 * pow(1.0 - facing, 3.0);\n" +
    "  color = vec4(vec3(pow(clamp(v, 0.0, 1.0), 1.0 / 2.2)), 1.0);\n" +
    "}\n";

  var gl = null, glCanvas = null, program = null, loc = {}, glError = "";
  var meshes = {}, views = [];

  function context() {
    if (gl || glError) return gl;
    glCanvas = document.createElement("canvas");
    gl = glCanvas.getContext("webgl2", {antialias: true, preserveDrawingBuffer: true});
    if (!gl) { glError = "WebGL 2 is not available in this browser"; return null; }
    program = gl.createProgram();
    [[gl.VERTEX_SHADER, VERT], [gl.FRAGMENT_SHADER, FRAG]].forEach(function (s) {
      var sh = gl.createShader(s[0]);
      gl.shaderSource(sh, s[1]); gl.compileShader(sh);
      if (!gl.getShaderParameter(sh, gl.COMPILE_STATUS)) glError = "shader: " + gl.getShaderInfoLog(sh);
      gl.attachShader(program, sh);
    });
    gl.linkProgram(program);
    if (glError || !gl.getProgramParameter(program, gl.LINK_STATUS)) {
      glError = glError || "shader link failed"; gl = null; return null;
    }
    ["a_pos", "u_q", "u_mv", "u_proj"].forEach(function (n) {
      loc[n] = n[0] === "a" ? gl.getAttribLocation(program, n) : gl.getUniformLocation(program, n);
    });
    return gl;
  }

  // meta: {vertices, faces, index: "u16"|"u32", lo: [x, y, z], scale, centre: [x, y, z], reach}; the data is
  // the positions as little-endian uint16 (x, y, z; world = lo + q / 65535 * scale), padded to 4 bytes,
  // then the triangle indices.
  function decode(meta, b64) {
    var bin = atob(b64), bytes = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    var posBytes = meta.vertices * 6, pad = (4 - posBytes % 4) % 4;
    var pos = new Uint16Array(bytes.buffer, 0, meta.vertices * 3);
    var Idx = meta.index === "u16" ? Uint16Array : Uint32Array;
    var idx = new Idx(bytes.buffer, posBytes + pad, meta.faces * 3);
    return {meta: meta, pos: pos, idx: idx, buffers: null};
  }

  function upload(m) {
    var vao = gl.createVertexArray();
    gl.bindVertexArray(vao);
    var vb = gl.createBuffer();
    gl.bindBuffer(gl.ARRAY_BUFFER, vb); gl.bufferData(gl.ARRAY_BUFFER, m.pos, gl.STATIC_DRAW);
    gl.enableVertexAttribArray(loc.a_pos);
    gl.vertexAttribPointer(loc.a_pos, 3, gl.UNSIGNED_SHORT, true, 0, 0);
    var ib = gl.createBuffer();
    gl.bindBuffer(gl.ELEMENT_ARRAY_BUFFER, ib); gl.bufferData(gl.ELEMENT_ARRAY_BUFFER, m.idx, gl.STATIC_DRAW);
    gl.bindVertexArray(null);
    m.buffers = {vao: vao, type: m.idx instanceof Uint16Array ? gl.UNSIGNED_SHORT : gl.UNSIGNED_INT};
  }

  // column-major 4x4 matrices, as WebGL wants them
  function lookFrom(eye, target) {
    var f = norm(sub(target, eye)), r = norm(cross(f, [0, 1, 0]));
    if (!isFinite(r[0])) r = [1, 0, 0];
    var u = cross(r, f);
    return [r[0], u[0], -f[0], 0, r[1], u[1], -f[1], 0, r[2], u[2], -f[2], 0,
            -dot(r, eye), -dot(u, eye), dot(f, eye), 1];
  }
  function perspective(fov, aspect, near, far) {
    var t = 1 / Math.tan(fov / 2), nf = 1 / (near - far);
    return [t / aspect, 0, 0, 0, 0, t, 0, 0, 0, 0, (far + near) * nf, -1, 0, 0, 2 * far * near * nf, 0];
  }
  function sub(a, b) { return [a[0] - b[0], a[1] - b[1], a[2] - b[2]]; }
  function dot(a, b) { return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]; }
  function cross(a, b) { return [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]; }
  function norm(a) { var l = Math.sqrt(dot(a, a)); return [a[0] / l, a[1] / l, a[2] / l]; }

  // The distance at which the mesh's bounding sphere fills the view with a 5% margin (as the previews do).
  function fitDistance(reach) { return Math.max(1.05 * reach / Math.sin(FOV / 2), reach + 0.1); }

  function draw(view) {
    var m = meshes[view.id], ctx = view.canvas.getContext("2d");
    if (!m || !context()) return false;
    if (!m.buffers) upload(m);
    var w = view.canvas.width, h = view.canvas.height;
    if (glCanvas.width !== w || glCanvas.height !== h) { glCanvas.width = w; glCanvas.height = h; }
    var c = m.meta.centre, el = view.el * Math.PI / 180, az = view.az * Math.PI / 180;
    var eye = [c[0] + view.dist * Math.cos(el) * Math.sin(az), c[1] + view.dist * Math.sin(el),
               c[2] + view.dist * Math.cos(el) * Math.cos(az)];
    var near = Math.max(view.dist - 2 * m.meta.reach, 0.01), far = view.dist + 2 * m.meta.reach;
    gl.viewport(0, 0, w, h);
    gl.clearColor(1, 1, 1, 1);
    gl.clear(gl.COLOR_BUFFER_BIT | gl.DEPTH_BUFFER_BIT);
    gl.enable(gl.DEPTH_TEST);
    gl.useProgram(program);
    var q = m.meta.lo.concat([m.meta.scale]);
    gl.uniform4f(loc.u_q, q[0], q[1], q[2], q[3]);
    gl.uniformMatrix4fv(loc.u_mv, false, lookFrom(eye, c));
    gl.uniformMatrix4fv(loc.u_proj, false, perspective(FOV, w / h, near, far));
    gl.bindVertexArray(m.buffers.vao);
    gl.drawElements(gl.TRIANGLES, m.idx.length, m.buffers.type, 0);
    gl.bindVertexArray(null);
    ctx.clearRect(0, 0, w, h);
    ctx.drawImage(glCanvas, 0, 0);
    if (!view.canvas.hasAttribute("data-drawn")) {
      view.canvas.setAttribute("data-drawn", "1");
      if (S2Viewer.ondraw) S2Viewer.ondraw(view.canvas);
    }
    return true;
  }

  function attach(view) {
    var c = view.canvas, drag = null;
    c.addEventListener("pointerdown", function (e) {
      drag = {x: e.clientX, y: e.clientY};
      try { c.setPointerCapture(e.pointerId); } catch (err) { /* a synthetic pointer has nothing to capture */ }
    });
    c.addEventListener("pointermove", function (e) {
      if (!drag) return;
      view.az -= (e.clientX - drag.x) * 0.5;
      view.el = Math.max(-89, Math.min(89, view.el + (e.clientY - drag.y) * 0.5));
      drag = {x: e.clientX, y: e.clientY};
      draw(view);
    });
    c.addEventListener("pointerup", function () { drag = null; });
    c.addEventListener("wheel", function (e) {
      e.preventDefault();
      var m = meshes[view.id];
      if (!m) return;
      view.dist = Math.max(m.meta.reach * 1.05, Math.min(view.dist * Math.exp(e.deltaY * 0.001), view.home.dist * 8));
      draw(view);
    }, {passive: false});
    c.addEventListener("dblclick", function () {
      view.el = view.home.el; view.az = view.home.az; view.dist = view.home.dist; draw(view);
    });
  }

  // A view of mesh `id` in a 2D canvas, first seen from (elevation, azimuth) degrees, +Y up, azimuth from +Z
  // towards +X: the angles of the library's previews.
  function view(canvas, id, elevation, azimuth) {
    var ratio = window.devicePixelRatio || 1;
    canvas.width = Math.round(canvas.clientWidth * ratio) || canvas.width;
    canvas.height = Math.round(canvas.clientHeight * ratio) || canvas.height;
    var v = {canvas: canvas, id: id, el: elevation, az: azimuth, dist: 0, home: null};
    views.push(v);
    attach(v);
    if (meshes[id]) ready(v);
    return v;
  }

  function ready(v) {
    v.dist = fitDistance(meshes[v.id].meta.reach);
    v.home = {el: v.el, az: v.az, dist: v.dist};
    if (!draw(v)) v.canvas.setAttribute("data-error", glError || "no mesh");
  }

  function mesh(id, meta, b64) {
    meshes[id] = decode(meta, b64);
    views.forEach(function (v) { if (v.id === id) ready(v); });
  }

  // ondraw(canvas): called once per view, after its first frame
  var S2Viewer = window.S2Viewer = {view: view, mesh: mesh, ondraw: null,
                                    error: function () { context(); return glError; }};
})();
