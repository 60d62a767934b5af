/* Web workers for a site opened from disk (file://), where the browser refuses `new Worker(url)`: the worker's
 * script runs in a hidden same-origin iframe instead, with postMessage / "message" events bridged both ways, as
 * the iframe-worker package does. Material's search needs it; mkdocs.yml lists this file as the polyfill that
 * material's offline plugin would otherwise load from the network. On http(s) the browser's Worker is kept. */
(function () {
  "use strict";
  if (location.protocol !== "file:") return;

  class IFrameWorker extends EventTarget {
    constructor(url) {
      super();
      this.onmessage = null;
      this.onerror = null;
      this._queue = [];
      this._ready = false;
      const iframe = (this._iframe = document.createElement("iframe"));
      iframe.hidden = true;
      iframe.setAttribute("aria-hidden", "true");
      iframe.setAttribute("title", "search worker");
      document.body.appendChild(iframe);
      const scope = (this._scope = iframe.contentWindow);
      const worker = this;
      // the worker's global scope: what it posts goes to the page, scripts it imports load in order
      scope.postMessage = (data) => setTimeout(() => worker._emit("message", { data }));
      scope.importScripts = (...urls) =>
        urls.reduce((done, src) => done.then(() => worker._load(src)), Promise.resolve());
      scope.addEventListener("error", (event) => worker._emit("error", { message: event.message }));
      this._load(new URL(url, location.href).href).then(() => {
        this._ready = true;
        this._queue.splice(0).forEach((data) => this.postMessage(data));
      });
    }

    _load(src) {
      return new Promise((resolve, reject) => {
        const script = this._scope.document.createElement("script");
        script.src = src;
        script.onload = resolve;
        script.onerror = () => {
          this._emit("error", { message: `could not load ${src}` });
          reject(new Error(`could not load ${src}`));
        };
        this._scope.document.body.appendChild(script);
      });
    }

    _emit(type, init) {
      const event = type === "message" ? new MessageEvent(type, init) : new ErrorEvent(type, init);
      this.dispatchEvent(event);
      const handler = this["on" + type];
      if (typeof handler === "function") handler.call(this, event);
    }

    postMessage(data) {
      if (!this._ready) {
        this._queue.push(data);
        return;
      }
      setTimeout(() => this._scope.dispatchEvent(new this._scope.MessageEvent("message", { data })));
    }

    terminate() {
      this._iframe.remove();
    }
  }

  window.IFrameWorker = IFrameWorker;
  window.Worker = IFrameWorker;
})();
