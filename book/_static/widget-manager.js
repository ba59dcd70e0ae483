// Loads the Jupyter widget manager on the pages that carry widget state (myst-nb adds this
// script only there, through nb_ipywidgets_js in _config.yml).
//
// The manager is two npm packages: RequireJS, which it needs, and the ipywidgets HTML manager.
// .ci/build_book.sh fetches both with npm at build time into _static/widgets/ of the built site,
// so that a book built with npm at hand shows its widgets offline. A site built without them
// (npm missing, or a bare `jupyter-book build`) loads the same versions from the CDN instead.
// The two "npm:" lines below are the one place where the versions are pinned.
(function () {
  "use strict";
  var cdn = "https://cdn.jsdelivr.net/npm/";
  var packages = [
    { npm: "requirejs@2.3.8", file: "require.js" },
    { npm: "@jupyter-widgets/html-manager@1.0.15", file: "dist/embed-amd.js" },
  ];
  var here = document.currentScript.src.replace(/[^/]*$/, "");

  function basename(path) {
    return path.slice(path.lastIndexOf("/") + 1);
  }

  // Append a <script> for packages[i] (local copy first, then the CDN); on load, go on with i + 1.
  function load(i, fromCdn) {
    if (i === packages.length) {
      return;
    }
    var pkg = packages[i];
    var script = document.createElement("script");
    script.src = fromCdn ? cdn + pkg.npm + "/" + pkg.file : here + "widgets/" + basename(pkg.file);
    // the HTML manager loads widget modules it does not bundle (none in this book) from here
    script.setAttribute("data-jupyter-widgets-cdn", cdn);
    script.onload = function () {
      load(i + 1, fromCdn);
    };
    script.onerror = function () {
      script.remove();
      if (fromCdn) {
        console.error("widget manager: could not load " + script.src);
      } else {
        load(i, true);
      }
    };
    document.head.appendChild(script);
  }

  // The HTML manager typesets widget text through MathJax 2's API (MathJax.Hub.Queue) whenever a
  // window.MathJax exists; the book loads MathJax 3, which has no Hub, so every widget label threw
  // a TypeError. Route those calls to MathJax 3 (the page's MathJax has loaded by window load,
  // before the manager renders any widget).
  window.addEventListener("load", function () {
    var mathjax = window.MathJax;
    if (mathjax && mathjax.startup && !mathjax.Hub) {
      mathjax.Hub = {
        Queue: function (job) {
          mathjax.startup.promise.then(function () {
            return mathjax.typesetPromise([job[2]]);
          });
        },
      };
    }
  });

  load(0, false);
})();
